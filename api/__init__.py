"""The HTTP API (SEED.md's endpoints): ``python -m api``."""
