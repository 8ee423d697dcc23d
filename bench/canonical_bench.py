"""Time ``rfc8785.dumps`` against ``agentflow_core.canonical.canonicalize``.

Uses a typical result envelope of about 600 canonical bytes and prints one JSON line::

    PYTHONPATH=libs .venv/bin/python bench/canonical_bench.py
"""

from __future__ import annotations

import json
import platform
import timeit
import uuid
from collections.abc import Callable
from typing import Any

import rfc8785

from agentflow_core.canonical import _fast_path_ok, canonicalize


def result_envelope() -> dict[str, Any]:
    run = uuid.UUID("0190a6f2-3b4c-7d5e-8f60-718293a4b5c6")
    step = uuid.UUID("0190a6f2-3b4d-7e01-9a2b-3c4d5e6f7081")
    return {
        "v": 1,
        "kind": "result",
        "tenant": "acme-corp",
        "run": str(run),
        "step": str(step),
        "attempt": 1,
        "step_hash": "sha256:9f2c4e1a7b3d5f60812a4c6e8b0d2f4163a5c7e9b1d3f5a7c9e1b3d5f7a9c1e3",
        "status": "succeeded",
        "output": {
            "summary": "Quarterly revenue grew 12% year over year, led by EMEA.",
            "sentiment": "positive",
            "entities": [
                {"name": "EMEA", "type": "region", "mentions": 3},
            ],
            "tokens": {"prompt": 812, "completion": 164},
            "citations": ["doc-17#p4", "doc-17#p9"],
            "truncated": False,
        },
        "error": None,
        "worker": "worker-7f3a9c-2",
        "delivery": 1,
        "started_us": 1_718_203_456_789_012,
        "finished_us": 1_718_203_458_001_337,
    }


def per_call_us(fn: Callable[[], object], repeat: int = 9) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    envelope = result_envelope()
    reference = rfc8785.dumps(envelope)
    assert canonicalize(envelope) == reference, "canonicalize disagrees with rfc8785"
    rfc_us = per_call_us(lambda: rfc8785.dumps(envelope))
    fast_us = per_call_us(lambda: canonicalize(envelope))
    print(
        json.dumps(
            {
                "bench": "canonicalize",
                "bytes": len(reference),
                "fast_path": _fast_path_ok(envelope),
                "rfc8785_us": round(rfc_us, 2),
                "canonicalize_us": round(fast_us, 2),
                "speedup": round(rfc_us / fast_us, 2),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
