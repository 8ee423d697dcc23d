"""The ``agentflow`` command line: the embedded stack, the server processes, and runs."""
