"""The durable engine: planning decisions, the transactional outbox, results, timers."""
