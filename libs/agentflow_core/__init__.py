"""AgentFlow's pure domain code, shared by the control plane, the workers and users.

Nothing in this package performs I/O: no FastAPI, database or NATS imports. Planners,
envelopes and spec models are plain functions and pydantic models, testable in
microseconds and replayable from recorded results.
"""

__version__ = "0.1.0"
