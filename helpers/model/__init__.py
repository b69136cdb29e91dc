"""The classifier: pretrained backbones, the new head, checkpoints."""
