"""cdcddp.ddp layer."""
