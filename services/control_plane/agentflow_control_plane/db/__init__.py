"""Persistence: SQLAlchemy models, the async engine, and tenant-scoped repositories."""
