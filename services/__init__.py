"""The services: thin wiring (settings, servicer, main) around the `rlhf` library."""
