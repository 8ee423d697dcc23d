"""Run event streams (WebSocket, SSE, JSON pages) against real control planes and workers."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from agentflow_control_plane.auth import issue_token
from agentflow_control_plane.db.session import make_engine, pg_autocommit
from agentflow_control_plane.events.store import EventSequencer
from agentflow_control_plane.settings import to_async_url
from agentflow_core.builders import linear_fsm
from tests.support.processes import Api, Cluster
from tests.support.services import TestEnv

pytestmark = pytest.mark.e2e

FINAL = ("run.succeeded", "run.failed", "run.cancelled")


def ws_url(url: str, path: str) -> str:
    return url.replace("http://", "ws://") + path


def headers(api: Api) -> dict[str, str]:
    return {"Authorization": api.client.headers["Authorization"]}


def ws_collect(url: str, hdrs: dict[str, str] | None, *, stop: int | None = None,
               timeout: float = 30) -> tuple[list[dict[str, Any]], int | None, str]:  # fmt: skip
    """Events of a WebSocket stream until it closes (or ``stop`` events); (events, close code, reason)."""
    events: list[dict[str, Any]] = []
    with connect(url, additional_headers=hdrs, open_timeout=10, close_timeout=2) as ws:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                events.append(json.loads(ws.recv(timeout=deadline - time.monotonic())))
                if stop is not None and len(events) >= stop:
                    return events, None, ""
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            return events, rcvd.code if rcvd else None, rcvd.reason if rcvd else ""
    raise AssertionError(f"stream still open after {timeout}s; got {[e['type'] for e in events]}")


def sse_collect(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    ids: list[int] = []
    with client.stream("GET", path, params=params, headers={"Accept": "text/event-stream"}, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in resp.iter_lines():
            if line == "":
                if "data" in fields:
                    event = json.loads(fields["data"])
                    assert fields["event"] == event["type"]
                    ids.append(int(fields["id"]))
                    events.append(event)
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    assert ids == [e["cursor"] for e in events]
    return events


def check_order(events: list[dict[str, Any]]) -> None:
    cursors = [e["cursor"] for e in events]
    assert cursors == sorted(set(cursors)), "cursors must increase strictly (no duplicate, no reordering)"


def test_run_stream_over_websocket_sse_and_json_agree(api: Api) -> None:
    assert api.put_workflow(linear_fsm("ev-lin", 3)).status_code in (200, 201)
    run_id = api.start("ev-lin", {"x": 1})
    path = f"/v1/runs/{run_id}/events"

    ws_events, code, reason = ws_collect(ws_url(api.url, path), headers(api))
    assert code == 1000, (code, reason)
    check_order(ws_events)
    types = [e["type"] for e in ws_events]
    assert types[0] == "run.created" and types[-1] == "run.succeeded"
    assert types.count("step.scheduled") == 3 and types.count("step.succeeded") == 3
    assert types.count("step.started") == 3  # the shared workers always send the started notice
    transitions = [(e["data"]["from"], e["data"]["to"]) for e in ws_events if e["type"] == "planner.transition"]
    assert transitions == [(None, "s0"), ("s0", "s1"), ("s1", "s2"), ("s2", "done")]
    for event in ws_events:
        assert event["run_id"] == run_id and event["workflow"] == "ev-lin"
    done = [e for e in ws_events if e["type"] == "step.succeeded"]
    assert [e["data"]["name"] for e in done] == ["s0", "s1", "s2"]
    assert all(e["data"]["worker"] in ("shared-1", "shared-2") and e["data"]["duration_ms"] >= 0 for e in done)
    # every step event names its step; a step is scheduled before it starts and succeeds
    for step_event in done:
        mine = [e["type"] for e in ws_events if e["step_id"] == step_event["step_id"]]
        assert mine == ["step.scheduled", "step.started", "step.succeeded"]

    sse_events = sse_collect(api.client, path)
    assert sse_events == ws_events

    page = api.client.get(path, params={"limit": 4})
    assert page.status_code == 200
    first = page.json()
    assert first["events"] == ws_events[:4] and first["next_cursor"] == ws_events[3]["cursor"]
    rest = api.client.get(path, params={"after": first["next_cursor"]}).json()
    assert first["events"] + rest["events"] == ws_events

    # resuming mid-way replays exactly the remainder, on both transports
    middle = ws_events[5]["cursor"]
    assert sse_collect(api.client, path, after=middle) == ws_events[6:]
    resumed, code, _ = ws_collect(ws_url(api.url, f"{path}?after={middle}"), headers(api))
    assert code == 1000 and resumed == ws_events[6:]
    # resuming at the final event of a run that just ended: nothing more, and the stream closes
    final = ws_events[-1]["cursor"]
    resumed, code, _ = ws_collect(ws_url(api.url, f"{path}?after={final}"), headers(api), timeout=10)
    assert (resumed, code) == ([], 1000)
    assert sse_collect(api.client, path, after=final) == []
    with api.client.stream("GET", path, headers={"Accept": "text/event-stream", "Last-Event-ID": str(middle)}) as r:
        body = r.read().decode()
    assert body.count("\nevent: ") + body.startswith("event: ") == len(ws_events) - 6


def test_failures_retries_and_cancellation_are_streamed(api: Api) -> None:
    spec = linear_fsm("ev-fail", 1, {"type": "fail", "times": 5, "retry": {"max_attempts": 2, "backoff_ms": 10}})
    assert api.put_workflow(spec).status_code in (200, 201), api.put_workflow(spec).text
    run_id = api.start("ev-fail")
    events, code, _ = ws_collect(ws_url(api.url, f"/v1/runs/{run_id}/events"), headers(api))
    assert code == 1000
    failed = [e["data"] for e in events if e["type"] == "step.failed"]
    assert [(f["attempt"], f["retrying"]) for f in failed] == [(1, True), (2, False)]
    assert [e["data"]["attempt"] for e in events if e["type"] == "step.scheduled"] == [1, 2]
    assert all(f["error"].startswith("failing on purpose") and f["status"] == "failed" for f in failed)
    # the FSM routes the error to its "failed" final state
    assert [e["data"]["to"] for e in events if e["type"] == "planner.transition"] == ["s0", "failed"]
    assert events[-1]["type"] in ("run.succeeded", "run.failed")

    slow = linear_fsm("ev-slow", 1, {"type": "sleep", "ms": 20000})
    assert api.put_workflow(slow).status_code in (200, 201)
    run_id = api.start("ev-slow")
    url = ws_url(api.url, f"/v1/runs/{run_id}/events")
    with connect(url, additional_headers=headers(api), close_timeout=2) as ws:
        seen = [json.loads(ws.recv(timeout=10))]
        while seen[-1]["type"] != "step.started":
            seen.append(json.loads(ws.recv(timeout=10)))
        assert api.client.post(f"/v1/runs/{run_id}/cancel").status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                seen.append(json.loads(ws.recv(timeout=10)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    assert [e["type"] for e in seen[-2:]] == ["step.cancelled", "run.cancelled"]
    assert seen[-1]["data"]["by"] == "user:test"


def test_tenant_stream_filters_and_tenant_isolation(api: Api, cluster: tuple[Cluster, str],
                                                    shared_env: TestEnv) -> None:  # fmt: skip
    other = Api(api.url, shared_env, api.tenant + "-b")
    for client in (api, other):
        assert client.put_workflow(linear_fsm("ev-t", 1)).status_code in (200, 201)
    assert api.put_workflow(linear_fsm("ev-u", 1)).status_code in (200, 201)

    url = ws_url(api.url, "/v1/events?type=run.&workflow=ev-t")
    with connect(url, additional_headers=headers(api), close_timeout=2) as ws:
        mine = api.start("ev-t")
        api.start("ev-u")  # another workflow: filtered out
        theirs = other.start("ev-t")  # another tenant: never visible
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in FINAL:
            got.append(json.loads(ws.recv(timeout=20)))
    assert {e["run_id"] for e in got} == {mine}
    assert all(e["type"].startswith("run.") for e in got)
    assert got[0]["type"] == "run.created"
    api.wait(mine)
    other.wait(theirs)

    # the other tenant's run: refused as if it did not exist, on every transport
    events, code, reason = ws_collect(ws_url(api.url, f"/v1/runs/{theirs}/events"), headers(api))
    assert (events, code) == ([], 4404) and "not found" in reason
    assert api.client.get(f"/v1/runs/{theirs}/events").status_code == 404
    page = api.client.get("/v1/events", params={"after": 0, "limit": 5000}).json()
    assert page["events"] and theirs not in {e["run_id"] for e in page["events"]}
    assert api.client.get("/v1/events", params={"type": "DROP TABLE"}).status_code == 422
    for query in ("type=DROP%20TABLE", "type=RUN.", "workflow=" + "w" * 129, "run_id=nope"):
        events, code, reason = ws_collect(ws_url(api.url, f"/v1/events?{query}"), headers(api))
        assert (events, code) == ([], 4400), (query, reason)
    assert api.client.get("/v1/events", params={"after": "abc"}).status_code == 422


def test_tickets_for_browsers(api: Api) -> None:
    assert api.put_workflow(linear_fsm("ev-tk", 1)).status_code in (200, 201)
    run_id = api.start("ev-tk")
    api.wait(run_id)
    path = f"/v1/runs/{run_id}/events"

    events, code, reason = ws_collect(ws_url(api.url, path), None)
    assert (events, code) == ([], 4401), reason
    assert httpx.get(api.url + path).status_code == 401

    issued = api.client.post("/v1/events/tickets")
    assert issued.status_code == 201
    ticket = issued.json()["ticket"]
    events, code, _ = ws_collect(ws_url(api.url, f"{path}?ticket={ticket}"), None)
    assert code == 1000 and events[-1]["type"] == "run.succeeded"
    # single use
    events, code, reason = ws_collect(ws_url(api.url, f"{path}?ticket={ticket}"), None)
    assert (events, code) == ([], 4401) and "ticket" in reason
    ticket = api.client.post("/v1/events/tickets").json()["ticket"]
    with httpx.Client(base_url=api.url) as anonymous:
        assert sse_collect(anonymous, path, ticket=ticket)[-1]["type"] == "run.succeeded"
    assert httpx.post(api.url + "/v1/events/tickets").status_code == 401


def test_resume_across_a_control_plane_restart_loses_nothing(make_env: Any) -> None:
    env: TestEnv = make_env()
    cluster = Cluster(env)
    try:
        proc, url = cluster.control_plane()
        cluster.worker(name="ev-w1", AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")
        api = Api(url, env, "restart")
        spec = linear_fsm("ev-long", 12, {"type": "sleep", "ms": 150})
        assert api.put_workflow(spec).status_code in (200, 201)
        run_id = api.start("ev-long")
        path = f"/v1/runs/{run_id}/events"
        first, _, _ = ws_collect(ws_url(url, path), headers(api), stop=10)
        tenant_first, _, _ = ws_collect(ws_url(url, "/v1/events?after=0"), headers(api), stop=7)

        proc.kill(signal.SIGKILL)  # no goodbye: the stream state lived in Postgres only
        _, url2 = cluster.control_plane()
        after = first[-1]["cursor"]
        rest, code, reason = ws_collect(ws_url(url2, f"{path}?after={after}"), headers(api), timeout=60)
        assert code == 1000, reason
        everything = first + rest
        check_order(everything)
        api = Api(url2, env, "restart")
        history = api.client.get(path, params={"limit": 5000}).json()["events"]
        assert everything == history
        assert everything[-1]["type"] == "run.succeeded"
        assert sum(e["type"] == "step.succeeded" for e in everything) == 12

        # the tenant stream resumes the same way (and without a run filter never ends)
        tenant_rest, code, _ = ws_collect(ws_url(url2, f"/v1/events?after={tenant_first[-1]['cursor']}"),
                                          headers(api), stop=len(history) - 7)  # fmt: skip
        assert tenant_first + tenant_rest == history

        # retention deleted the events: resuming from before them would leave a gap (own
        # database: the retention mark is global)
        first = history[0]["cursor"]
        asyncio.run(_age_and_prune(env, "restart"))
        gone = api.client.get(path, params={"after": first})
        assert gone.status_code == 410 and gone.json()["code"] == "cursor_expired"
        events, code, reason = ws_collect(ws_url(url2, f"/v1/events?after={first}"), headers(api))
        assert (events, code) == ([], 4410) and "retention" in reason
        # after=0 asks for whatever is kept: not a gap
        assert api.client.get("/v1/events", params={"after": 0}).json()["events"] == []
    finally:
        cluster.close()


def test_slow_consumers_are_disconnected_and_resume(make_env: Any) -> None:
    env: TestEnv = make_env()
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(AGENTFLOW_EVENTS_BUFFER="10")
        cluster.worker(name="ev-w2")
        api = Api(url, env, "slow")
        # 30 parallel steps: one decision schedules them all, one batch of 30 events
        # reaches the stream at once, more than its buffer of 10.
        spec = {"name": "ev-fan", "agents": {"a": {"type": "echo"}},
                "planner": {"type": "dag", "steps": {f"n{i}": {"agent": "a"} for i in range(30)}}}  # fmt: skip
        assert api.put_workflow(spec).status_code in (200, 201)
        with connect(ws_url(url, "/v1/events"), additional_headers=headers(api), close_timeout=2) as ws:
            run_id = api.start("ev-fan")
            got: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    got.append(json.loads(ws.recv(timeout=20)))
        rcvd = closed.value.rcvd
        assert rcvd is not None and rcvd.code == 4429, rcvd
        last = got[-1]["cursor"] if got else 0
        assert "slow consumer" in rcvd.reason and "after=" in rcvd.reason
        api.wait(run_id)
        # resuming from the last event received loses nothing
        history = api.client.get(f"/v1/runs/{run_id}/events", params={"limit": 5000}).json()["events"]
        if got:
            resumed, _, _ = ws_collect(ws_url(url, f"/v1/runs/{run_id}/events?after={last}"), headers(api))
            assert got + resumed == history
        assert sum(e["type"] == "step.scheduled" for e in history) == 30
        assert history[-1]["type"] == "run.succeeded"
    finally:
        cluster.close()


async def _age_and_prune(env: TestEnv, tenant: str) -> None:
    """Make the tenant's events a month old, then run retention as the sequencer does."""
    engine = make_engine(to_async_url(env.database_url), pool_size=2)
    try:
        async with pg_autocommit(engine) as conn:
            await conn.execute("UPDATE events SET created_at = now() - interval '30 days' WHERE tenant_id = $1", tenant)
        await EventSequencer(engine, retention_days=7).prune_once()
    finally:
        await engine.dispose()


def test_bad_cursors_are_refused_clearly(api: Api, shared_env: TestEnv) -> None:
    assert api.put_workflow(linear_fsm("ev-c", 1)).status_code in (200, 201)
    run_id = api.start("ev-c")
    api.wait(run_id)
    ahead = api.client.get("/v1/events", params={"after": 10**15},
                           headers={"Accept": "text/event-stream"})  # fmt: skip
    assert ahead.status_code == 422 and "ahead of the stream" in ahead.json()["detail"]
    page = api.client.get("/v1/events", params={"after": 10**15})
    assert page.status_code == 422 and page.json()["errors"][0]["loc"] == "query.after"
    events, code, reason = ws_collect(ws_url(api.url, f"/v1/runs/{run_id}/events?after=-1"), headers(api))
    assert (events, code) == ([], 4400) and "after" in reason
    token = issue_token(shared_env.secret, tenant=api.tenant, roles=["viewer"], subject="v", ttl_s=60)
    viewer = {"Authorization": f"Bearer {token}"}
    events, code, _ = ws_collect(ws_url(api.url, f"/v1/runs/{run_id}/events"), viewer)
    assert code == 1000 and events[-1]["type"] == "run.succeeded"
