"""Resource sampling, metrics history and alerts."""
