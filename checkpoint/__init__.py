"""State capture: per-step in-memory snapshots of model, optimizer, RNG and data position."""
