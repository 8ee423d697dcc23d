"""A small ExecProfile for sandbox tests: tight limits, so breaches show fast."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agentflow_core.exec_profile import ExecProfile

SMALL = ExecProfile(
    runtime="process",
    network="none",
    allowed_hosts=(),
    filesystem="tmp",
    cpu_seconds=2.0,
    memory_mb=256,
    timeout_s=5.0,
    output_bytes=100_000,
    max_processes=32,
    max_open_files=64,
    max_file_mb=8,
)


def small_profile(**changes: Any) -> ExecProfile:
    return replace(SMALL, **changes)
