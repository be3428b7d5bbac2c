"""Optimizers and measures that know nothing of devices: the SAT perturbation and sharpness."""
