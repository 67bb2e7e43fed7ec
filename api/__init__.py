"""The HTTP API (SEED.md's endpoints); not in this version yet."""
