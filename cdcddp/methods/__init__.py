"""cdcddp.methods layer."""
