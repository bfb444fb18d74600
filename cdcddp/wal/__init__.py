"""cdcddp.wal layer."""
