"""Model repository, loading formats, the worker's model cache and dynamic batching."""
