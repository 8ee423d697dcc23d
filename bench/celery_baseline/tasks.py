"""Celery app and the single ``echo`` task used by the Celery baseline benchmark.

Broker and result backend are both the Redis URL in ``BENCH_REDIS_URL``
(default ``redis://127.0.0.1:6379/15``: a dedicated DB number, because the
runner flushes it before and after a run).  The environment variable is read
at import time, so the runner sets it before importing this module and passes
it on to the worker subprocesses.

The configuration is a plain, production-like one; everything not listed here
is a Celery default (JSON serializer, ``task_acks_late=False``, results stored
for every task, no task events, no ``task_track_started``):

* ``task_default_queue="bench"``: workers consume only ``-Q bench``, so a
  stray worker of some other app on the same Redis never steals our messages.
* ``worker_prefetch_multiplier=4``: the Celery default, stated explicitly.
* ``result_expires=600``: result keys get a 10 minute TTL instead of one day.
* ``broker_connection_retry_on_startup=True``: silences the 5.x deprecation
  warning, does not change behaviour.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
QUEUE = "bench"

REDIS_URL = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)

app = Celery("agentflow_celery_baseline", broker=REDIS_URL, backend=REDIS_URL)

# Exposed so the runner can report exactly what was configured.
SETTINGS: dict[str, Any] = {
    "task_default_queue": QUEUE,
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "task_acks_late": False,
    "task_ignore_result": False,
    "worker_prefetch_multiplier": 4,
    "result_expires": 600,
    "broker_connection_retry_on_startup": True,
}
app.conf.update(SETTINGS)


@app.task(name="bench.echo")
def echo(x: Any) -> Any:
    """Return the input unchanged; in a chain the output feeds the next step."""
    return x
