"""In-memory copies of the step and run rows an engine transaction works on.

Rows are loaded (locked) once per batch, changed in memory, and written back in the
batch's single statement (see :mod:`.writes`); ``dirty`` marks what to write.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson

from agentflow_control_plane.engine.writes import dumps_or_none

ACTIVE = ("queued", "running")
FINAL_RUN = ("succeeded", "failed", "cancelled")


class StepRow:
    __slots__ = (
        "agent",
        "attempt",
        "attempts",
        "dirty",
        "error",
        "finished_at",
        "has_result",
        "id",
        "max_attempts",
        "next_attempt_at",
        "output",
        "pickups_before",
        "queued_at",
        "result_hash",
        "run_id",
        "seq",
        "started_at",
        "state",
        "status",
        "step_hash",
        "tenant",
        "worker",
    )  # fmt: skip

    def __init__(self, row: Any) -> None:
        (self.id, self.run_id, self.tenant, self.seq, self.state, self.agent, self.status, self.attempt,
         self.max_attempts, self.attempts, self.pickups_before, self.step_hash, self.queued_at,
         self.started_at, self.worker) = row[:15]  # fmt: skip
        self.finished_at: datetime | None = None
        self.next_attempt_at: datetime | None = None
        self.output: Any = None
        self.error: str | None = None
        self.result_hash: str | None = None
        self.has_result: bool = row[21]
        self.dirty = False

    def update_tuple(self) -> tuple[Any, ...]:
        return (
            self.id, self.status, self.attempt, self.attempts, self.pickups_before, self.worker,
            self.started_at, self.finished_at, self.next_attempt_at, dumps_or_none(self.output), self.error,
            self.step_hash, self.result_hash, self.queued_at,
        )  # fmt: skip


class RunRow:
    __slots__ = (
        "dirty",
        "error",
        "finished_at",
        "id",
        "input",
        "key",
        "output",
        "started_at",
        "state",
        "status",
        "traceparent",
        "wake_at",
    )

    def __init__(
        self,
        run_id: uuid.UUID,
        status: str,
        state: dict[str, Any],
        run_input: Any,
        key: tuple[str, str, int],
        started_at: datetime | None,
        wake_at: datetime | None,
        traceparent: str | None = None,
    ) -> None:
        self.id = run_id
        self.status = status
        self.state = state
        self.input = run_input
        self.key = key
        self.started_at = started_at
        self.wake_at = wake_at
        #: the run's trace context (``runs.traceparent``): the parent of its decisions' spans
        self.traceparent = traceparent
        self.output: Any = None
        self.error: str | None = None
        self.finished_at: datetime | None = None
        self.dirty = False

    @classmethod
    def from_load(cls, row: Any) -> RunRow:
        """From a row of the result path's LOAD query (step columns first)."""
        return cls(row[1], row[15], row[16], row[17], (row[2], row[18], row[19]), row[20], row[22], row[23])

    def update_tuple(self) -> tuple[Any, ...]:
        return (
            self.status, orjson.dumps(self.state).decode(), dumps_or_none(self.output), self.error,
            self.started_at, self.finished_at, self.wake_at,
        )  # fmt: skip
