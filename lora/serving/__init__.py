"""The multi-adapter server: the adapter host, request batching, guards (API key, body size, adapter root) and the
FastAPI app."""
