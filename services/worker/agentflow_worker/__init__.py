"""The AgentFlow worker: pulls steps from JetStream, runs agents, publishes results."""
