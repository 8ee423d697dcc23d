"""The durable loop: retries, timeouts, error routes, and envelope verification on both sides."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import orjson

from agentflow_bus.connection import ensure_consumer
from agentflow_bus.settings import BusSettings
from agentflow_bus.subjects import Names
from agentflow_core.envelope import open_envelope, seal
from tests.support.processes import Api, Cluster, chain_workflow
from tests.support.services import TestEnv


def test_failed_attempts_are_retried_with_backoff(api: Api) -> None:
    api.put_workflow(chain_workflow("retry", 1, {"type": "fail", "times": 2,
                                                 "retry": {"max_attempts": 3, "backoff_ms": 100}}))  # fmt: skip
    run = api.wait(api.start("retry", "x"))
    assert run["status"] == "succeeded", run
    [step] = run["steps"]
    assert (step["attempt"], step["attempts"], step["status"]) == (3, 3, "succeeded")
    envelopes = api.client.get(f"/v1/runs/{run['id']}/envelopes").json()
    assert sorted((e["kind"], e["attempt"]) for e in envelopes) == [
        ("result", 1), ("result", 2), ("result", 3), ("step", 1), ("step", 2), ("step", 3)
    ]  # fmt: skip
    results = [e["envelope"] for e in envelopes if e["kind"] == "result"]
    assert [r["status"] for r in sorted(results, key=lambda r: r["attempt"])] == [
        "failed",
        "failed",
        "succeeded",
    ]
    # Backoff: attempt 3 started at least 100 + 200 ms after attempt 1 finished.
    first, last = (
        sorted(results, key=lambda r: r["attempt"])[0],
        sorted(results, key=lambda r: r["attempt"])[-1],
    )
    assert last["started_us"] - first["finished_us"] >= 300_000


def test_exhausted_retries_follow_on_error(api: Api) -> None:
    spec = {
        "name": "errpath",
        "agents": {
            "bad": {"type": "fail", "times": 5, "retry": {"max_attempts": 2}},
            "rescue": {"type": "echo"},
        },
        "planner": {
            "type": "fsm",
            "initial_state": "try",
            "states": {
                "try": {"agent": "bad", "on_success": "done", "on_error": "rescue"},
                "rescue": {"agent": "rescue", "on_success": "done"},
            },
            "final_states": ["done"],
        },
    }
    assert api.put_workflow(spec).status_code == 200
    run = api.wait(api.start("errpath", {"k": 1}))
    assert run["status"] == "succeeded"
    assert [(s["state"], s["status"], s["attempts"]) for s in run["steps"]] == [
        ("try", "failed", 2), ("rescue", "succeeded", 1)
    ]  # fmt: skip
    assert "failing on purpose" in run["steps"][0]["error"]


def test_timeout_fails_the_step_and_the_run(api: Api) -> None:
    api.put_workflow(chain_workflow("timeout", 1, {"type": "sleep", "ms": 5000, "timeout_s": 0.2}))
    started = time.monotonic()
    run = api.wait(api.start("timeout", None))
    assert time.monotonic() - started < 4
    assert run["status"] == "failed" and "timed out after 0.2s" in run["error"]
    assert run["steps"][0]["status"] == "failed"


# --- a hand-driven "worker" that takes a step message off the queue -----------------------


async def _take_step(env: TestEnv, queue: str) -> tuple[bytes, dict[str, Any], str]:
    settings = BusSettings(nats_url=env.services.nats_url, nats_prefix=env.prefix)
    names = Names(env.prefix)
    nc = await nats.connect(env.services.nats_url)
    try:
        js = nc.jetstream()
        await ensure_consumer(js, stream=names.steps_stream, durable=names.step_consumer(queue),
                              filter_subject=names.step_filter(queue), ack_wait=settings.step_ack_wait_s,
                              max_deliver=settings.step_max_deliver)  # fmt: skip
        sub = await js.pull_subscribe_bind(names.step_consumer(queue), stream=names.steps_stream)
        [msg] = await sub.fetch(1, timeout=10)
        await msg.ack()
        body, _digest = open_envelope(msg.data)
        return msg.data, body, msg.subject
    finally:
        await nc.close()


async def _publish(env: TestEnv, subject: str, data: bytes, msg_id: str) -> None:
    nc = await nats.connect(env.services.nats_url)
    try:
        await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id})
    finally:
        await nc.close()


def _result_for(step: dict[str, Any], step_hash: str, output: Any) -> dict[str, Any]:
    now = time.time_ns() // 1000
    return {"v": 1, "kind": "result", "tenant": step["tenant"], "run": step["run"], "step": step["step"],
            "attempt": step["attempt"], "step_hash": step_hash, "status": "succeeded", "output": output,
            "error": None, "worker": "hand", "delivery": 1, "started_us": now, "finished_us": now}  # fmt: skip


def test_worker_rejects_a_tampered_step_and_the_control_plane_records_why(
    api: Api, cluster: tuple[Cluster, str], shared_env: TestEnv
) -> None:
    api.put_workflow(chain_workflow("tamper", 1, {"type": "echo", "queue": "tamper"}))
    run_id = api.start("tamper", {"amount": 10})
    raw, _body, subject = asyncio.run(_take_step(shared_env, "tamper"))
    forged = raw.replace(b'"amount":10', b'"amount":99999')
    assert forged != raw
    asyncio.run(_publish(shared_env, subject, forged, "forged-1"))
    worker = cluster[0].worker(name="tamper-worker", queue="tamper")
    run = api.wait(run_id)
    assert worker.alive(), "a tampered message must not crash the worker"
    assert run["status"] == "failed"
    assert "step envelope rejected: hash mismatch" in run["steps"][0]["error"]


def test_control_plane_rejects_a_tampered_result_and_ignores_duplicates(api: Api, shared_env: TestEnv) -> None:
    api.put_workflow(chain_workflow("forged-result", 2, {"type": "echo", "queue": "hand"}))
    run_id = api.start("forged-result", "in")
    names = Names(shared_env.prefix)

    # Step 1: a correct result, published three times (a re-publishing worker).
    _, step, _ = asyncio.run(_take_step(shared_env, "hand"))
    digest = api.run(run_id)["steps"][0]["step_hash"]
    wire, _ = seal(_result_for(step, digest, "out-1"))
    for n in range(3):
        asyncio.run(_publish(shared_env, names.result_subject(step["tenant"]), wire, f"dup-{n}"))

    # Step 2: a result whose content no longer matches its hash.
    _, step2, _ = asyncio.run(_take_step(shared_env, "hand"))
    run = api.run(run_id)
    assert next(s["status"] for s in run["steps"]) == "succeeded"
    wire2, _ = seal(_result_for(step2, run["steps"][1]["step_hash"], "honest"))
    forged = wire2.replace(b'"honest"', b'"forged"')
    asyncio.run(_publish(shared_env, names.result_subject(step2["tenant"]), forged, "forged-result"))
    run = api.wait(run_id)
    assert run["status"] == "failed"
    assert run["steps"][1]["error"].startswith("result rejected: hash mismatch")
    envelopes = api.client.get(f"/v1/runs/{run_id}/envelopes").json()
    kinds = [(e["kind"], e["step"] == run["steps"][0]["id"]) for e in envelopes]
    assert kinds.count(("result", True)) == 1, "a duplicate result must be recorded once"
    rejected = [e for e in envelopes if e["kind"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["raw"].encode() == forged
    assert orjson.loads(forged)["output"] == "forged"
