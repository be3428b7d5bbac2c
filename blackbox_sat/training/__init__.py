"""The parts training methods are built from: context, configuration, device objectives,
physics-aware steps, trust regions, the black-box pipeline and zeroth-order refinement."""
