"""Flower classifier helpers, in packages by layer (see LAYERS): the notebook, the command
lines, the benchmarks and the app are built on them."""

__version__ = "0.1.0"

# The layers, lowest first: a module imports its own layer or those below, never above (even
# inside a function). Each is a package of that name, but config, one module: the settings.
LAYERS = ("core", "config", "data", "model", "serve", "train", "insight", "cli")
