"""cdcddp.publish layer."""
