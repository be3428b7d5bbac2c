"""Tasks (datasets and their splits) and the fixed encoding that carries features to a device."""
