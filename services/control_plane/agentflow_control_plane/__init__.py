"""The AgentFlow control plane: REST API, durable engine and outbox dispatcher."""
