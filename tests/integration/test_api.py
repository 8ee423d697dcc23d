"""REST API v1 against a real control plane, Postgres and NATS (and real workers)."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import jwt
import rfc8785

from tests.support.processes import Api, Cluster, chain_workflow
from tests.support.services import TestEnv
from tests.unit.test_spec import HELLO


def test_hello_runs_to_completion_with_steps_and_envelopes(api: Api) -> None:
    put = api.put_workflow(HELLO)
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 1 and put.json()["spec_hash"].startswith("sha256:")
    run_id = api.start("hello", {"msg": "hi"})
    run = api.wait(run_id)
    assert run["status"] == "succeeded", run
    assert run["output"] == {"msg": "hi"}
    assert [s["state"] for s in run["steps"]] == ["greet", "nap"]
    for step in run["steps"]:
        assert step["status"] == "succeeded" and step["attempts"] == 1
        assert step["worker"] in ("shared-1", "shared-2")
        assert step["step_hash"].startswith("sha256:") and step["result_hash"].startswith("sha256:")
        assert step["started_at"] and step["finished_at"]
    assert run["steps"][1]["duration_ms"] >= 45  # the sleep agent's 50 ms

    envelopes = api.client.get(f"/v1/runs/{run_id}/envelopes").json()
    assert [(e["kind"], e["attempt"]) for e in envelopes] == [("step", 1), ("result", 1)] * 2
    by_step = {}
    for e in envelopes:
        # Re-verify from the outside with a stock JCS library, from the stored bytes.
        body = json.loads(e["raw"])
        claimed = body.pop("hash")
        assert claimed == e["hash"] == "sha256:" + hashlib.sha256(rfc8785.dumps(body)).hexdigest()
        by_step.setdefault(e["step"], {})[e["kind"]] = e
    for pair in by_step.values():
        assert pair["result"]["envelope"]["step_hash"] == pair["step"]["hash"]
    # A step carries only what its agent needs, not the accumulated run state.
    second_step = envelopes[2]["envelope"]
    assert second_step["payload"] == {"input": {"msg": "hi"}, "last": {"msg": "hi"}}


def test_workflow_versions_are_immutable_and_runs_pin_them(api: Api) -> None:
    spec = chain_workflow("versions", 1)
    first = api.put_workflow(spec).json()
    again = api.put_workflow(spec).json()
    assert (first["version"], again["version"], again["created"]) == (1, 1, False)
    spec["agents"]["a"] = {"type": "sleep", "ms": 1}
    second = api.put_workflow(spec).json()
    assert second["version"] == 2 and second["spec_hash"] != first["spec_hash"]
    got = api.client.get("/v1/workflows/versions").json()
    assert got["version"] == 2 and got["versions"] == [1, 2]
    assert (
        api.client.get("/v1/workflows/versions", params={"version": 1}).json()["spec"]["agents"]["a"]["type"] == "echo"
    )
    pinned = api.wait(api.start("versions", 1, version=1))
    assert pinned["version"] == 1 and pinned["status"] == "succeeded"


def test_invalid_spec_is_422_naming_the_field_and_stores_nothing(api: Api) -> None:
    spec = chain_workflow("broken", 2)
    spec["planner"]["states"]["s0"]["on_success"] = "nowhere"
    response = api.put_workflow(spec)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_failed"
    assert {"loc": "planner.states.s0.on_success", "msg": "unknown state 'nowhere'"} in body["errors"]
    assert api.client.get("/v1/workflows/broken").status_code == 404
    bad_yaml = api.client.put("/v1/workflows/y", content=b"name: [", headers={"Content-Type": "application/yaml"})
    assert bad_yaml.status_code == 422 and bad_yaml.json()["errors"][0]["loc"] == "body"
    assert api.client.put("/v1/workflows/bad%20name", json=spec).status_code == 422


def test_unknown_workflow_and_run_are_404(api: Api) -> None:
    response = api.client.post("/v1/runs", json={"workflow": "ghost", "input": {}})
    assert response.status_code == 404 and "ghost" in response.json()["detail"]
    assert api.client.get("/v1/runs/00000000-0000-4000-8000-000000000000").status_code == 404
    assert api.client.get("/v1/runs/not-a-uuid").status_code == 422


def test_non_canonicalizable_input_is_422_and_nothing_stored(api: Api, shared_env: TestEnv) -> None:
    api.put_workflow(chain_workflow("canon", 1))
    before = shared_env.query("SELECT count(*) FROM runs WHERE tenant_id = $1", api.tenant)[0][0]
    for raw in (b'{"workflow":"canon","input":NaN}', b'{"workflow":"canon","input":[Infinity]}',
                b'{"workflow":"canon","input":9007199254740993}'):  # fmt: skip
        response = api.client.post("/v1/runs", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["code"] == "not_canonicalizable"
    after = shared_env.query("SELECT count(*) FROM runs WHERE tenant_id = $1", api.tenant)[0][0]
    assert before == after


def test_body_limit_is_413(api: Api) -> None:
    big = {"workflow": "x", "input": "a" * (1_048_576 + 10)}
    response = api.client.post("/v1/runs", json=big)
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


def test_auth_failures_are_401_and_viewers_cannot_write(cluster: tuple[Cluster, str], shared_env: TestEnv) -> None:
    url = cluster[1]
    assert httpx.get(f"{url}/v1/runs").status_code == 401
    forged = jwt.encode({"sub": "x", "tenant": "t", "roles": ["admin"], "exp": 9999999999}, "x" * 40)
    expired = jwt.encode({"sub": "x", "tenant": "t", "exp": int(time.time()) - 60}, shared_env.secret)
    none_alg = jwt.encode({"sub": "x", "tenant": "t", "exp": 9999999999}, None, algorithm="none")
    for token in (forged, expired, none_alg, "garbage"):
        response = httpx.get(f"{url}/v1/runs", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token
        assert response.json()["code"] == "unauthorized"
    viewer = Api(url, shared_env, "viewer-tenant", roles=("viewer",))
    response = viewer.put_workflow(chain_workflow("v", 1))
    assert response.status_code == 403
    assert viewer.client.get("/v1/runs").status_code == 200


def test_tenants_cannot_see_each_other(api: Api, cluster: tuple[Cluster, str], shared_env: TestEnv) -> None:
    api.put_workflow(chain_workflow("mine", 1))
    run_id = api.start("mine", 1)
    other = Api(cluster[1], shared_env, api.tenant + "-other")
    assert other.client.get(f"/v1/runs/{run_id}").status_code == 404
    assert other.client.get(f"/v1/runs/{run_id}/envelopes").status_code == 404
    assert other.client.post(f"/v1/runs/{run_id}/cancel").status_code == 404
    assert other.client.get("/v1/workflows/mine").status_code == 404
    assert run_id not in {r["id"] for r in other.client.get("/v1/runs").json()}


def test_idempotency_key_returns_the_same_run(api: Api) -> None:
    api.put_workflow(chain_workflow("idem", 1))
    headers = {"Idempotency-Key": "order-42"}
    first = api.client.post("/v1/runs", json={"workflow": "idem", "input": 1}, headers=headers)
    second = api.client.post("/v1/runs", json={"workflow": "idem", "input": 1}, headers=headers)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    clash = api.client.post("/v1/runs", json={"workflow": "idem", "input": 2}, headers=headers)
    assert clash.status_code == 409 and clash.json()["code"] == "conflict"
    assert len([r for r in api.client.get("/v1/runs").json() if r["workflow"] == "idem"]) == 1


def test_cancel_stops_a_running_run(api: Api) -> None:
    spec = chain_workflow("slow", 3, {"type": "sleep", "ms": 3000})
    api.put_workflow(spec)
    run_id = api.start("slow", None)
    deadline = time.monotonic() + 10
    while api.run(run_id)["steps"][0]["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = api.client.post(f"/v1/runs/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(0.5)
    run = api.run(run_id)
    assert run["status"] == "cancelled"
    assert [s["status"] for s in run["steps"]] == ["cancelled"]


def test_health_ready_metrics_and_openapi(cluster: tuple[Cluster, str]) -> None:
    url = cluster[1]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"ready": True, "postgres": True, "nats": True}
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("agentflow_steps_dispatched_total", "agentflow_step_latency_seconds_bucket",
                 "agentflow_results_batch_size_bucket", "agentflow_http_request_duration_seconds_bucket"):  # fmt: skip
        assert name in metrics
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/workflows/{name}", "/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/envelopes",
            "/v1/runs/{run_id}/cancel"} <= set(paths)  # fmt: skip
