"""Training: plans, the one loop, the recipes, the activation cache, calibration, a whole run."""
