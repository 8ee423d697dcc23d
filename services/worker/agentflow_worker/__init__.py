"""The AgentFlow worker: pulls steps from JetStream, runs agents, publishes results."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agentflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
