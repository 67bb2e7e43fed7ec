"""Pieces every component shares: settings, Redis keys, errors, Redis connections."""
