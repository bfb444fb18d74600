"""cdcddp.server layer."""
