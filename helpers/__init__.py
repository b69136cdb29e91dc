"""Flower classifier helpers: one module per pipeline stage, used by the notebook and the CLIs."""

__version__ = "0.1.0"
