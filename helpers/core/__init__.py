"""The bottom layer: errors a user can cause, files written whole, device and signals, torchrun."""
