"""The audit chain through a real control plane, workers, Postgres and JetStream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import nats
import pytest

from agentflow_bus.settings import stream_token
from agentflow_core.audit import GENESIS_HASH, entry_body, entry_hash
from tests.support.processes import Api, Cluster, chain_workflow
from tests.support.services import TestEnv, _asyncpg_dsn


def _settle(api: Api) -> dict[str, Any]:
    """Wait until everything written so far is sealed into the chain (within ~0.2 s)."""
    deadline = time.monotonic() + 15
    while True:
        response = api.client.get("/v1/audit/verify")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["pending"] == 0:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def _entries(api: Api, **params: Any) -> list[dict[str, Any]]:
    _settle(api)
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = api.client.get("/v1/audit", params={**params, "after": after, "limit": 50}).json()
        out += page["entries"]
        if page["next_after"] is None:
            return out
        after = page["next_after"]


def _verify(api: Api) -> dict[str, Any]:
    return _settle(api)


async def _sql(env: TestEnv, *statements: tuple[str, tuple[Any, ...]]) -> list[Any]:
    """Run statements as the superuser with triggers disabled (how an attacker with database
    access would tamper), in one transaction."""
    conn = await asyncpg.connect(_asyncpg_dsn(env.database_url))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            return [await conn.execute(sql, *args) for sql, args in statements]
    finally:
        await conn.close()


def _run_once(api: Api, name: str = "audited") -> dict[str, Any]:
    assert api.put_workflow(chain_workflow(name, 2)).status_code == 200
    run = api.wait(api.start(name, {"q": "x"}))
    _settle(api)
    return run


def test_a_run_leaves_a_verifiable_chain_of_what_happened(api: Api) -> None:
    run = _run_once(api)
    assert run["status"] == "succeeded"
    entries = _entries(api)
    actions = [e["action"] for e in entries]
    assert actions[0] == "workflow.created"
    assert actions.count("step.dispatched") == 2 and actions.count("step.completed") == 2
    assert actions.index("run.created") < actions.index("step.dispatched") < actions.index("run.finished")
    # Every entry is linked to the one before and hashes to its stored hash, recomputed
    # here independently of the server from the JSON the API returned.
    prev = GENESIS_HASH
    for i, e in enumerate(entries, start=1):
        assert e["seq"] == i and e["prev_hash"] == prev and e["tenant"] == api.tenant
        body = entry_body(
            **{k: e[k] for k in ("tenant", "seq", "ts", "actor", "action", "resource", "data", "prev_hash")}
        )
        assert entry_hash(body) == e["hash"]
        prev = e["hash"]
    dispatched = [e for e in entries if e["action"] == "step.dispatched"]
    envelopes = {(x["step"], x["kind"]): x["hash"] for x in api.client.get(f"/v1/runs/{run['id']}/envelopes").json()}
    for e in dispatched:  # the entries carry the hashes of the envelopes actually sent
        assert envelopes[(e["data"]["step"], "step")] == e["data"]["envelope_hash"]
    completed = [e for e in entries if e["action"] == "step.completed"]
    assert {e["actor"] for e in completed} <= {"worker:shared-1", "worker:shared-2"}
    assert all(envelopes[(e["data"]["step"], "result")] == e["data"]["result_hash"] for e in completed)
    assert entries[actions.index("run.created")]["actor"] == "user:test"
    finished = entries[actions.index("run.finished")]
    assert finished["data"] == {"run": run["id"], "status": "succeeded"}

    verdict = _verify(api)
    assert verdict["ok"] is True and verdict["length"] == len(entries) == verdict["recorded_length"]
    assert verdict["head_hash"] == entries[-1]["hash"] and verdict["first_bad_seq"] is None


def test_filters_and_pagination(api: Api) -> None:
    run = _run_once(api, "filtered")
    other = api.wait(api.start("filtered", {"q": "y"}))
    mine = _entries(api, run=run["id"])
    assert mine and all(e["data"]["run"] == run["id"] for e in mine)
    assert not any(e["data"].get("run") == other["id"] for e in mine)
    steps = _entries(api, action="step.*")
    assert steps and {e["action"] for e in steps} == {"step.dispatched", "step.completed"}
    assert [e["action"] for e in _entries(api, action="workflow.created")] == ["workflow.created"]
    assert {e["actor"] for e in _entries(api, actor="user:test")} == {"user:test"}
    assert _entries(api, since="2999-01-01T00:00:00Z") == []
    page = api.client.get("/v1/audit", params={"limit": 3}).json()
    assert len(page["entries"]) == 3 and page["next_after"] == 3
    bad = api.client.get("/v1/audit", params={"action": "DROP TABLE"})
    assert bad.status_code == 422 and "action" in bad.text


def test_the_database_refuses_to_rewrite_audit_rows(api: Api, shared_env: TestEnv) -> None:
    _run_once(api, "forward")

    async def attempt(sql: str) -> str:
        conn = await asyncpg.connect(_asyncpg_dsn(shared_env.database_url))
        try:
            await conn.execute(sql)
            return "allowed"
        except asyncpg.PostgresError as exc:
            return str(exc)
        finally:
            await conn.close()

    tenant = api.tenant
    for sql in (
        f"UPDATE audits SET actor = 'mallory' WHERE tenant_id = '{tenant}' AND seq = 1",
        f"DELETE FROM audits WHERE tenant_id = '{tenant}' AND seq = 2",
        "TRUNCATE audits",
    ):
        outcome = asyncio.run(attempt(sql))
        assert "append-only" in outcome, (sql, outcome)
    assert _verify(api)["ok"] is True


@pytest.mark.parametrize("tamper", ["change", "delete", "reorder", "truncate_tail"])
def test_tampering_is_found_at_the_exact_entry(api: Api, shared_env: TestEnv, tamper: str) -> None:
    _run_once(api, "tampered")
    entries = _entries(api)
    n, t = len(entries), api.tenant
    assert n == 7  # workflow.created, run.created, 2 x (step.dispatched, step.completed), run.finished
    if tamper == "change":
        asyncio.run(_sql(shared_env, ("UPDATE audits SET data = data || '{\"status\": \"failed\"}' "
                                      "WHERE tenant_id = $1 AND seq = 5", (t,))))  # fmt: skip
        expected = 5
    elif tamper == "delete":
        asyncio.run(_sql(shared_env, ("DELETE FROM audits WHERE tenant_id = $1 AND seq = 4", (t,))))
        expected = 4
    elif tamper == "reorder":  # swap the contents of entries 3 and 6, hashes and all
        asyncio.run(
            _sql(
                shared_env,
                ("UPDATE audits SET seq = -3 WHERE tenant_id = $1 AND seq = 3", (t,)),
                ("UPDATE audits SET seq = 3 WHERE tenant_id = $1 AND seq = 6", (t,)),
                ("UPDATE audits SET seq = 6 WHERE tenant_id = $1 AND seq = -3", (t,)),
            )
        )
        expected = 3
    else:  # cut off the newest entries (and even move the head row back to match)
        asyncio.run(
            _sql(
                shared_env,
                ("DELETE FROM audits WHERE tenant_id = $1 AND seq > $2", (t, n - 2)),
                (
                    "UPDATE audit_heads SET seq = $2,"
                    " hash = (SELECT hash FROM audits WHERE tenant_id = $1 AND seq = $2) WHERE tenant_id = $1",
                    (t, n - 2),
                ),
            )
        )
        expected = None
    verdict = _verify(api)
    if expected is None:
        # A clean cut that also rewrote the head row leaves a consistent shorter chain: only
        # the external anchor can tell (see test_anchors_catch_a_consistently_rewritten_chain).
        assert verdict["ok"] is True and verdict["length"] == n - 2
        return
    assert verdict["ok"] is False and verdict["first_bad_seq"] == expected, verdict
    assert verdict["problem"]


def test_a_rolled_back_change_leaves_no_entry(api: Api, shared_env: TestEnv) -> None:
    """Entries are written by the transaction of the change: an invalid workflow (422) and
    a run of an unknown workflow (404) leave the chain untouched."""
    _run_once(api, "rollback")
    before = _verify(api)
    assert api.put_workflow({"name": "broken", "agents": {}, "planner": {"type": "fsm"}}).status_code == 422
    assert api.client.post("/v1/runs", json={"workflow": "nope"}).status_code == 404
    after = _verify(api)
    assert (after["length"], after["head_hash"]) == (before["length"], before["head_hash"])


@pytest.fixture
def two_control_planes(make_env: Any) -> Iterator[tuple[TestEnv, list[str]]]:
    env: TestEnv = make_env()
    cluster = Cluster(env)
    try:
        urls = [cluster.control_plane()[1] for _ in range(2)]
        cluster.worker(name="w1", AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")
        cluster.worker(name="w2", AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")
        yield env, urls
    finally:
        cluster.close()


def test_concurrent_appends_from_two_control_planes_make_one_chain(
    two_control_planes: tuple[TestEnv, list[str]],
) -> None:
    env, urls = two_control_planes
    apis = [Api(url, env, "shared-tenant") for url in urls]
    assert apis[0].put_workflow(chain_workflow("race", 3)).status_code == 200

    def start(i: int) -> str:
        return apis[i % 2].start("race", {"i": i})

    with ThreadPoolExecutor(8) as pool:
        run_ids = list(pool.map(start, range(40)))
    for i, run_id in enumerate(run_ids):
        assert apis[i % 2].wait(run_id, timeout=60)["status"] == "succeeded"
    entries = _entries(apis[1])
    # 1 workflow + per run: created, 3 dispatched, 3 completed, finished
    assert len(entries) == 1 + 40 * 8
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    for api in apis:
        verdict = _verify(api)
        assert verdict["ok"] is True and verdict["length"] == len(entries), verdict


def test_anchors_catch_a_consistently_rewritten_chain(make_env: Any, tmp_path: Any) -> None:
    env: TestEnv = make_env()
    anchor_file = tmp_path / "anchors.jsonl"
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(
            AGENTFLOW_AUDIT_ANCHOR_INTERVAL_S="0.2", AGENTFLOW_AUDIT_ANCHOR_FILE=str(anchor_file)
        )
        cluster.worker(name="w1", AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")
        api = Api(url, env, "anchored")
        _run_once(api, "anchored")
        length = _verify(api)["length"]
        deadline = time.monotonic() + 10
        while True:
            verdict = _verify(api)
            if verdict.get("anchor") and verdict["anchor"]["seq"] == length:
                break
            assert time.monotonic() < deadline, verdict
            time.sleep(0.1)
        assert verdict["ok"] is True and verdict["anchor"]["matches"] is True
        lines = [json.loads(line) for line in anchor_file.read_text().splitlines()]
        assert lines[-1]["seq"] == length and lines[-1]["hash"] == verdict["head_hash"]

        # The anchor stream refuses deletes and purges through the NATS API.
        async def try_remove() -> list[str]:
            nc = await nats.connect(env.services.nats_url)
            js = nc.jetstream()
            stream = f"{stream_token(env.prefix)}_AUDIT_ANCHORS"
            outcomes = []
            for op in (lambda: js.purge_stream(stream), lambda: js.delete_msg(stream, 1)):
                try:
                    await op()
                    outcomes.append("allowed")
                except Exception as exc:
                    outcomes.append(type(exc).__name__ + str(exc))
            await nc.close()
            return outcomes

        assert all(o != "allowed" for o in asyncio.run(try_remove()))

        # Rewrite entry 2 and re-hash everything after it, head row included: the chain
        # is internally consistent again, but no longer matches its anchor.
        async def rewrite() -> None:
            conn = await asyncpg.connect(_asyncpg_dsn(env.database_url))
            try:
                async with conn.transaction():
                    await conn.execute("SET LOCAL session_replication_role = replica")
                    rows = await conn.fetch(
                        "SELECT seq, ts, actor, action, resource, data::text, prev_hash FROM audits "
                        "WHERE tenant_id = 'anchored' ORDER BY seq"
                    )
                    prev = GENESIS_HASH
                    for seq, ts, actor, action, resource, data, _ in rows:
                        data = json.loads(data)
                        if seq == 2:
                            data["forged"] = True
                        body = entry_body(tenant="anchored", seq=seq, ts=ts, actor=actor, action=action,
                                          resource=resource, data=data, prev_hash=prev)  # fmt: skip
                        digest = entry_hash(body)
                        await conn.execute(
                            "UPDATE audits SET data = $2::jsonb, prev_hash = $3, hash = $4 "
                            "WHERE tenant_id = 'anchored' AND seq = $1",
                            seq, json.dumps(data), prev, digest,
                        )  # fmt: skip
                        prev = digest
                    await conn.execute("UPDATE audit_heads SET hash = $1 WHERE tenant_id = 'anchored'", prev)
            finally:
                await conn.close()

        asyncio.run(rewrite())
        verdict = _verify(api)
        assert verdict["ok"] is False and verdict["first_bad_seq"] == length
        assert verdict["anchor"]["matches"] is False and "anchor" in verdict["problem"]
    finally:
        cluster.close()


def test_verification_needs_a_token(cluster: tuple[Cluster, str]) -> None:
    import httpx

    assert httpx.get(f"{cluster[1]}/v1/audit/verify").status_code == 401


def test_cli_verifies_straight_from_postgres_and_fails_on_tampering(api: Api, shared_env: TestEnv) -> None:
    import subprocess
    import sys

    _run_once(api, "cli-checked")
    argv = [sys.executable, "-m", "agentflow_cli", "audit", "verify", "--database-url", shared_env.database_url,
            "--tenant", api.tenant]  # fmt: skip
    env = {"COLUMNS": "250", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 0 and api.tenant in ok.stdout and "yes" in ok.stdout, ok.stdout + ok.stderr
    asyncio.run(
        _sql(shared_env, ("UPDATE audits SET actor = 'mallory' WHERE tenant_id = $1 AND seq = 2", (api.tenant,)))
    )
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 1 and "NO" in bad.stdout and "hash mismatch" in bad.stdout, bad.stdout
    usage = subprocess.run([*argv[:5], "--tenant", "x"], capture_output=True, text=True, timeout=60, env=env)
    assert usage.returncode == 2 and "--tenant needs --database-url" in usage.stderr


def test_auth_failures_are_counted_into_the_chains(make_env: Any) -> None:
    import httpx
    import jwt

    env: TestEnv = make_env()
    cluster = Cluster(env)
    try:
        _, url = cluster.control_plane(AGENTFLOW_AUDIT_AUTH_FLUSH_S="1")
        for _ in range(5):
            assert httpx.get(f"{url}/v1/runs", headers={"Authorization": "Bearer nonsense"}).status_code == 401
        forged = jwt.encode({"sub": "x", "tenant": "_system", "exp": int(time.time()) + 60}, env.secret)
        assert httpx.get(f"{url}/v1/audit", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        viewer = Api(url, env, "watched", roles=("viewer",))
        assert viewer.put_workflow(chain_workflow("nope", 1)).status_code == 403

        def tenant_entries(tenant: str) -> list[dict[str, Any]]:
            async def read() -> list[dict[str, Any]]:
                conn = await asyncpg.connect(_asyncpg_dsn(env.database_url))
                try:
                    rows = await conn.fetch("SELECT actor, data::text FROM audits WHERE tenant_id = $1 "
                                            "AND action = 'auth.failed' ORDER BY seq", tenant)  # fmt: skip
                    return [{"actor": r[0], **json.loads(r[1])} for r in rows]
                finally:
                    await conn.close()

            return asyncio.run(read())

        deadline = time.monotonic() + 10
        while not (tenant_entries("_system") and tenant_entries("watched")):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        system = tenant_entries("_system")
        malformed = [e for e in system if e["reason"].startswith("malformed token")]
        # counted, not itemised (several flushes may have passed meanwhile)
        assert sum(e["count"] for e in malformed) == 5 and len(malformed) < 5
        assert {(e["status"], e["actor"]) for e in malformed} == {(401, "client:127.0.0.1")}
        assert any("reserved" in e["reason"] for e in system)
        [refused] = tenant_entries("watched")
        assert refused["status"] == 403 and refused["count"] == 1 and refused["path"] == "/v1/workflows/nope"
        # The tenant sees its own refusal through the API, and its chain verifies.
        page = viewer.client.get("/v1/audit", params={"action": "auth.failed"}).json()
        assert [e["data"]["status"] for e in page["entries"]] == [403]
        assert viewer.client.get("/v1/audit/verify").json()["ok"] is True
    finally:
        cluster.close()
