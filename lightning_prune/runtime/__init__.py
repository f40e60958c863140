"""Where a round runs: collectives (``distributed``), FSDP2 rows (``sharding``), numerics."""
