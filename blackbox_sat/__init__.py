"""blackbox_sat: sharpness-aware training of physical neural networks."""
