"""Budgets and calibration end to end: a real control plane, two workers, Postgres, NATS,
and the fake OpenAI-compatible model server (the only simulated part)."""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.support.fake_llm import FakeOpenAI
from tests.support.processes import Api, Cluster
from tests.support.services import Services, TestEnv

#: $1000 / $2000 per million tokens: a 10-token prompt and 50-token answer cost $0.11
PRICES = {"house-model": {"input_per_million": 1000, "output_per_million": 2000}}


@pytest.fixture(scope="module")
def stack(services: Services) -> Iterator[tuple[Cluster, str, TestEnv, FakeOpenAI]]:
    env = TestEnv.create(services)
    cluster = Cluster(env)
    shared = {"AGENTFLOW_LLM_PRICES": json.dumps(PRICES)}
    fake = FakeOpenAI().__enter__()
    try:
        _, url = cluster.control_plane(**shared)
        for i in (1, 2):
            cluster.worker(name=f"bw-{i}", AGENTFLOW_WORKER_CONCURRENCY="16", **shared)
        yield cluster, url, env, fake
    finally:
        fake.__exit__(None, None, None)
        cluster.close()
        env.destroy()


@pytest.fixture
def api(stack: tuple[Cluster, str, TestEnv, FakeOpenAI]) -> Api:
    """A fresh tenant per test: budgets and windows never leak between tests."""
    _, url, env, _ = stack
    return Api(url, env, f"bud-{secrets.token_hex(4)}")


def _llm(fake: FakeOpenAI, max_tokens: int = 100, **extra: Any) -> dict[str, Any]:
    model = {"provider": "openai", "model": "house-model", "api_base": fake.api_base, "max_tokens": max_tokens}
    return {"type": "llm", "model": model, "prompt": "Say hi.", **extra}


def _chain(name: str, agents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = list(agents)
    states = {n: {"on_success": names[i + 1] if i + 1 < len(names) else "done"} for i, n in enumerate(names)}
    return {
        "name": name,
        "agents": agents,
        "planner": {"type": "fsm", "initial_state": names[0], "states": states, "final_states": ["done"]},
    }


def _register(api: Api, spec: dict[str, Any]) -> None:
    response = api.put_workflow(spec)
    assert response.status_code == 200, response.text


def _put(api: Api, name: str, **body: Any) -> httpx.Response:
    return api.client.put(f"/v1/budgets/{name}", json=body)


def _audit(api: Api, action: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while api.client.get("/v1/audit/verify").json()["pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    entries: list[dict[str, Any]] = api.client.get("/v1/audit", params={"action": action}).json()["entries"]
    return entries


def _settled(api: Api, name: str) -> dict[str, Any]:
    """The budget once nothing is reserved any more (finished runs release within ~1 s)."""
    deadline = time.monotonic() + 15
    while True:
        budget: dict[str, Any] = api.client.get(f"/v1/budgets/{name}").json()
        if budget["current"]["reserved_usd"] == "0.00":
            return budget
        assert time.monotonic() < deadline, budget
        time.sleep(0.1)


def test_budgets_are_validated_stored_listed_deleted_and_audited(api: Api) -> None:
    bad = [
        ({"scope": "tenant", "period": "day"}, "limit_usd, limit_tokens"),
        ({"scope": "workflow", "period": "day", "limit_usd": 1}, "target"),
        ({"scope": "run", "period": "month", "limit_usd": 1}, "period"),
        ({"scope": "tenant", "target": "x", "period": "day", "limit_usd": 1}, "target"),
        ({"scope": "tenant", "period": "week", "limit_usd": 1}, "period"),
        ({"scope": "tenant", "period": "day", "limit_usd": -1}, "limit_usd"),
        ({"scope": "tenant", "period": "day", "limit_usd": "0.00000000001"}, "limit_usd"),
        ({"scope": "tenant", "period": "day", "limit_usd": 1, "enforcment": "hard"}, "enforcment"),
    ]
    for body, named in bad:
        response = _put(api, "b", **body)
        assert response.status_code == 422, (body, response.text)
        assert named in response.text, (body, response.text)
    assert api.client.put("/v1/budgets/bad name!", json={"scope": "tenant", "period": "day"}).status_code == 422

    created = _put(api, "daily", scope="tenant", period="day", limit_usd="12.5", limit_tokens=1000)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["limit_usd"], body["limit_tokens"], body["enforcement"]) == ("12.50", 1000, "hard")
    assert body["current"]["remaining_usd"] == "12.50" and body["current"]["window"] == time.strftime(
        "%Y-%m-%d", time.gmtime()
    )
    assert _put(api, "daily", scope="tenant", period="day", limit_usd="12.5", limit_tokens=1000).status_code == 200
    changed = _put(api, "daily", scope="tenant", period="day", limit_usd=20, enforcement="soft")
    assert changed.status_code == 200 and changed.json()["limit_tokens"] is None
    assert _put(api, "per-run", scope="run", period="run", limit_tokens=500).json()["current"] is None
    listed = api.client.get("/v1/budgets").json()
    assert [b["name"] for b in listed] == ["daily", "per-run"]
    assert api.client.delete("/v1/budgets/per-run").status_code == 204
    assert api.client.get("/v1/budgets/per-run").status_code == 404
    assert api.client.delete("/v1/budgets/per-run").status_code == 404

    sets = _audit(api, "budget.set")
    # the unchanged PUT wrote nothing
    assert [(e["data"]["budget"], e["data"]["limit_usd"]) for e in sets] == [
        ("daily", "12.50"), ("daily", "20.00"), ("per-run", None)
    ]  # fmt: skip
    assert sets[1]["data"]["previous"]["limit_usd"] == "12.50" and sets[0]["actor"] == "user:test"
    assert [e["data"]["budget"] for e in _audit(api, "budget.deleted")] == ["per-run"]


def test_a_run_whose_estimate_exceeds_a_hard_budget_is_refused_with_the_numbers(
    api: Api, stack: tuple[Cluster, str, TestEnv, FakeOpenAI]
) -> None:
    _, _, _, fake = stack
    _register(api, _chain("pricey", {"a": _llm(fake)}))
    estimate = api.client.post("/v1/runs", params={"dry_run": "true"}, json={"workflow": "pricey"}).json()["estimate"]
    assert estimate["expected_cost_usd"] > 0.05
    assert _put(api, "cap", scope="workflow", target="pricey", period="run", limit_usd="0.05").status_code == 201
    refused = api.client.post("/v1/runs", json={"workflow": "pricey"})
    assert refused.status_code == 402, refused.text
    body = refused.json()
    assert body["code"] == "budget_exceeded" and "budget 'cap'" in body["detail"]
    numbers = body["errors"]
    assert (numbers["budget"], numbers["limit_usd"], numbers["remaining_usd"]) == ("cap", "0.05", "0.05")
    assert Decimal(numbers["requested_usd"]) == Decimal(str(estimate["expected_cost_usd"])).quantize(Decimal("1e-10"))
    assert api.client.get("/v1/runs", params={"workflow": "pricey"}).json() == []  # nothing started
    [entry] = _audit(api, "budget.refused")
    assert entry["data"]["limit_usd"] == "0.05" and entry["data"]["workflow"] == "pricey"
    # Budgets of other workflows do not apply.
    _register(api, _chain("other", {"a": {"type": "echo"}}))
    assert api.wait(api.start("other", {}))["status"] == "succeeded"


def test_fifty_concurrent_runs_racing_for_the_last_dollars_never_overspend(
    api: Api, stack: tuple[Cluster, str, TestEnv, FakeOpenAI]
) -> None:
    cluster, _, _, fake = stack
    fake.script({"content": "hi", "usage": {"prompt_tokens": 10, "completion_tokens": 50}, "delay": 0.05})
    _register(api, _chain("raced", {"one": _llm(fake), "two": _llm(fake)}))
    assert _put(api, "pot", scope="workflow", target="raced", period="day", limit_usd="2.00").status_code == 201

    def start(_: int) -> tuple[int, str | None]:
        response = api.client.post("/v1/runs", json={"workflow": "raced"})
        return response.status_code, response.json().get("id")

    with ThreadPoolExecutor(50) as pool:
        started = list(pool.map(start, range(50)))
    assert {code for code, _ in started} <= {201, 402}, started
    runs = [api.wait(run_id, timeout=90) for code, run_id in started if code == 201 and run_id]
    statuses = [r["status"] for r in runs]
    assert set(statuses) <= {"succeeded", "failed"}, statuses
    for run in runs:
        if run["status"] == "failed":
            assert run["error"].startswith("budget_exceeded: budget 'pot'"), run["error"]
    refused = sum(1 for code, _ in started if code == 402)
    assert refused + statuses.count("failed") > 0, "the budget never bit: the test proves nothing"
    assert statuses.count("succeeded") >= 1, (statuses, cluster.logs())

    ledger = api.client.get("/v1/costs", params={"workflow": "raced", "period": "today"}).json()["total"]
    spent = Decimal(ledger["cost_usd"])
    assert spent <= Decimal("2.00"), ledger
    # The numbers add up: the budget's window counts exactly what the ledger holds, and
    # nothing stays reserved once every run is over.
    budget = _settled(api, "pot")
    assert Decimal(budget["current"]["spent_usd"]) == spent
    assert Decimal(budget["current"]["remaining_usd"]) == Decimal("2.00") - spent


def test_a_run_stops_mid_way_when_its_next_attempt_does_not_fit(
    api: Api, stack: tuple[Cluster, str, TestEnv, FakeOpenAI]
) -> None:
    _, _, _, fake = stack
    # Every answer breaks the output schema (one repair round, then the attempt fails),
    # after spending two calls: 2 x $0.11.
    fake.script({"content": "not json", "usage": {"prompt_tokens": 10, "completion_tokens": 50}})
    agent = _llm(fake, output_schema={"type": "object"}, retry={"max_attempts": 3})
    _register(api, _chain("retried", {"a": agent}))
    dry = api.client.post("/v1/runs", params={"dry_run": "true"}, json={"workflow": "retried"}).json()["estimate"]
    [step] = dry["steps"]
    reservation = Decimal(str(step["max_cost_usd"])) / step["attempts"] * Decimal("1.2")
    # Room for the first attempt's reservation, not for the second after the first spent $0.22.
    limit = (reservation + Decimal("0.1")).quantize(Decimal("0.01"))
    assert _put(api, "each-run", scope="run", period="run", limit_usd=str(limit)).status_code == 201

    run = api.wait(api.start("retried", {}), timeout=60)
    assert run["status"] == "failed"
    assert run["error"].startswith("budget_exceeded: budget 'each-run'"), run["error"]
    assert [s["attempt"] for s in run["steps"]] == [1]  # the retry was never dispatched
    assert Decimal(run["usage"]["cost_usd"]) == Decimal("0.22")
    [window] = run["budgets"]
    assert (window["name"], window["window"], window["spent_usd"]) == ("each-run", run["id"], "0.22")
    [stopped] = _audit(api, "budget.exceeded")
    assert stopped["data"]["run"] == run["id"] and stopped["data"]["spent_usd"] == "0.22"


def test_a_soft_budget_warns_once_and_stops_nothing(api: Api, stack: tuple[Cluster, str, TestEnv, FakeOpenAI]) -> None:
    _, _, _, fake = stack
    fake.script({"content": "hi", "usage": {"prompt_tokens": 10, "completion_tokens": 50}})
    _register(api, _chain("watched", {"a": _llm(fake)}))
    assert _put(api, "heads-up", scope="agent", target="a", period="month", limit_usd="0.15",
                enforcement="soft").status_code == 201  # fmt: skip
    runs = [api.wait(api.start("watched", {}), timeout=60) for _ in range(3)]
    assert [r["status"] for r in runs] == ["succeeded"] * 3
    budget = _settled(api, "heads-up")
    assert budget["current"]["spent_usd"] == "0.33" and budget["current"]["remaining_usd"] == "-0.18"
    assert budget["current"]["warned"] is True
    warnings = _audit(api, "budget.warning")
    # The spend that passed the limit is recorded once; later runs were warned at creation.
    passed = [e for e in warnings if "reason" not in e["data"]]
    assert len(passed) == 1 and passed[0]["data"]["spent_usd"] == "0.22"
    assert all(e["data"]["reason"] == "estimate" for e in warnings if e not in passed)
    assert runs[2]["budgets"][0]["name"] == "heads-up" and runs[2]["budgets"][0]["warned"] is True


def test_calibration_brings_the_median_error_under_five_percent(
    api: Api, stack: tuple[Cluster, str, TestEnv, FakeOpenAI]
) -> None:
    """A repeated summarizing workload: prompts of different lengths, answers of 180-220
    tokens (the server counts both itself), estimated at first from ``max_tokens``."""
    cluster, _, _, fake = stack
    rng = random.Random(7)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "wizards",
        "quietly",
        "hex",
    ]
    _register(api, _chain("summaries", {"summarize": _llm(fake, max_tokens=400, prompt="Summarize: {text}")}))
    first_error = None
    for i in range(40):
        fake.script({"content": "x" * (4 * rng.randint(180, 220))})
        text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))
        run = api.wait(api.start("summaries", {"text": text}), timeout=60)
        assert run["status"] == "succeeded", (run["steps"], cluster.logs())
        if i == 0:
            report = api.client.get("/v1/costs/calibration", params={"last": 1}).json()
            first_error = report["cost_error"]["p50"]
        if i == 8:
            time.sleep(5.5)  # control planes re-read correction factors every 5 s
    report = api.client.get("/v1/costs/calibration", params={"last": 20}).json()
    [group] = report["groups"]
    assert (group["agent"], group["model"], group["samples"]) == ("summarize", "openai/house-model", 40)
    assert first_error is not None and first_error > 0.5  # max_tokens is a poor guess
    assert group["uncorrected_token_error"]["p50"] > 0.3
    assert group["completion_factor"] == pytest.approx(0.5, abs=0.06)  # ~200 of max_tokens 400
    assert report["cost_error"]["p50"] <= 0.05, report
    assert report["token_error"]["p50"] <= 0.05, report
