"""Use cases: what the API does, independent of HTTP."""
