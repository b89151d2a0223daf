"""Model definitions, the TorchServe handler, archiving and replica configs."""
