"""The worker runtime end to end: real control plane, Postgres, NATS and worker processes.

One installation with a tools file, a secrets directory, a workspace, the fake
OpenAI-compatible model server and a custom agent plugin (the `agentflow scaffold agent`
skeleton, discovered through a real ``agentflow.agents`` entry point on PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from agentflow_bus.subjects import Names
from agentflow_cli.scaffold import write_agent_skeleton
from tests.support.fake_llm import FakeOpenAI
from tests.support.processes import Api, Cluster
from tests.support.services import Services, TestEnv

TOOLS_FILE = """
tools:
  - id: word_count
    description: Count the words of a text
    handler:
      kind: command
      argv:
        - python3
        - -I
        - -c
        - "import json,sys; t=json.load(sys.stdin)['text']; print(json.dumps({'words': len(t.split())}))"
    input_schema:
      type: object
      properties: {text: {type: string}}
      required: [text]
      additionalProperties: false
    output_schema:
      type: object
      properties: {words: {type: integer}}
      required: [words]
    cost_per_call: 0.25
    rate_limit: 3/hour
  - id: leaky
    handler: {kind: command, argv: [python3, -c, "print(1)"]}
    permissions: {secrets: [NOT_ALLOWED]}
tenant_policies:
  default: {allowed_secrets: []}
"""

ROOT = Path(__file__).resolve().parents[2]


def _mcp_section() -> str:
    """The test MCP server over stdio, inside the process sandbox (base interpreter +
    the venv's site-packages bound read-only through PYTHONPATH)."""
    import mcp

    from agentflow_worker.sandbox.process import ProcessSandbox

    server = {
        "transport": "stdio",
        "command": [ProcessSandbox().python, str(ROOT / "tests" / "support" / "mcp_server.py"), "--transport", "stdio"],
        "env": {"PYTHONPATH": str(Path(mcp.__file__ or "").resolve().parents[1])},
        "cost_per_call": 0.5,
    }
    return "mcp:\n  enabled: true\n  servers:\n    calc: " + json.dumps(server) + "\n"


def _plugin_path(root: Path) -> str:
    """The scaffolded agent package plus a dist-info declaring its entry point."""
    [pyproject, *_] = write_agent_skeleton("greeter", root)
    site = root / "site"
    info = site / "agentflow_greeter-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: agentflow-greeter\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[agentflow.agents]\ngreeter = greeter_agent.agent:GreeterAgent\n")
    return f"{site}:{pyproject.parent / 'src'}"


@pytest.fixture(scope="module")
def runtime(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Cluster, FakeOpenAI]]:
    root = tmp_path_factory.mktemp("runtime")
    tools = root / "tools.yaml"
    tools.write_text(TOOLS_FILE + _mcp_section())
    workspace = root / "workspace"
    env = TestEnv.create(services)
    cluster = Cluster(env)
    plugin = _plugin_path(root / "plugin")
    prices = json.dumps({"house-model": {"input_per_million": 1000, "output_per_million": 2000}})
    shared = {"AGENTFLOW_TOOLS_FILE": str(tools), "PYTHONPATH": plugin, "AGENTFLOW_LLM_PRICES": prices}
    fake = FakeOpenAI().__enter__()
    try:
        _, url = cluster.control_plane(**shared)
        for i in (1, 2):
            cluster.worker(
                name=f"rt-{i}",
                AGENTFLOW_WORKSPACE_DIR=str(workspace),
                AGENTFLOW_WORKER_HEARTBEAT_S="0.5",
                **shared,
            )
        yield Api(url, env, f"rt-{secrets.token_hex(3)}"), cluster, fake
    finally:
        fake.__exit__(None, None, None)
        cluster.close()
        env.destroy()


def _one_step(name: str, agent: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "agents": {"a": agent},
        "planner": {"type": "dag", "steps": [{"name": "only", "agent": "a"}]},
    }
    if tools:
        spec["tools"] = tools
    return spec


def _register(api: Api, spec: dict[str, Any]) -> None:
    response = api.put_workflow(spec)
    assert response.status_code == 200, response.text


def test_custom_agent_plugin_runs_and_its_settings_are_validated(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, _ = runtime
    _register(api, _one_step("greet", {"type": "greeter", "greeting": "Hi"}))
    run = api.wait(api.start("greet", {"name": "Ada"}))
    assert run["status"] == "succeeded", cluster.logs()
    assert run["steps"][0]["output"] == {"message": "Hi, Ada!"}
    # The control plane validates the plugin's Config model at registration.
    bad = api.put_workflow(_one_step("greet-bad", {"type": "greeter", "greting": "Hi"}))
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"] == "agents.a.greting"


def test_tool_agent_runs_a_sandboxed_command_and_records_the_call(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, _ = runtime
    _register(api, _one_step("count", {"type": "tool", "tool": "word_count"}))
    run = api.wait(api.start("count", {"text": "one two three"}))
    assert run["status"] == "succeeded", ([s["error"] for s in run["steps"]], cluster.logs())
    assert run["steps"][0]["output"] == {"words": 3}
    assert run["usage"]["cost_usd"].startswith("0.25")
    [call] = api.client.get(f"/v1/runs/{run['id']}/tool-calls").json()
    assert (call["tool"], call["outcome"], call["agent"]) == ("word_count", "ok", "a")
    assert call["input_hash"].startswith("sha256:") and call["output_hash"].startswith("sha256:")


def test_bad_tool_input_and_denied_secrets_fail_the_step_with_the_reason(
    runtime: tuple[Api, Cluster, FakeOpenAI],
) -> None:
    api, _, _ = runtime
    _register(api, _one_step("count-bad", {"type": "tool", "tool": "word_count"}))
    run = api.wait(api.start("count-bad", {"txt": "no text field"}))
    assert run["status"] == "failed"
    assert "does not match its schema" in run["steps"][0]["error"]
    assert "'text' is a required property" in run["steps"][0]["error"]
    [call] = api.client.get(f"/v1/runs/{run['id']}/tool-calls").json()
    assert call["outcome"] == "invalid_input" and call["cost_usd"].startswith("0")

    _register(api, _one_step("leak", {"type": "tool", "tool": "leaky"}))
    run = api.wait(api.start("leak", {}))
    assert run["status"] == "failed"
    assert "NOT_ALLOWED" in run["steps"][0]["error"] and "tenant policy" in run["steps"][0]["error"]


def test_code_executor_runs_python_contained(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, _, _ = runtime
    _register(api, _one_step("py", {"type": "tool", "tool": "code_executor"}))
    code = (
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 5432), 1); print('reached')\n"
        "except OSError: print('blocked')"
    )
    run = api.wait(api.start("py", {"language": "python", "code": code}))
    assert run["status"] == "succeeded", run
    out = run["steps"][0]["output"]
    assert out["stdout"].strip() == "blocked" and out["exit_code"] == 0


def test_rate_limit_holds_across_workers(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, _, _ = runtime
    _register(api, _one_step("limited", {"type": "tool", "tool": "word_count"}))
    # Earlier tests of this tenant used word_count too: start from what is left.
    runs = [api.wait(api.start("limited", {"text": f"call {i}"})) for i in range(4)]
    statuses = [r["status"] for r in runs]
    assert statuses.count("failed") >= 1
    failed = next(r for r in runs if r["status"] == "failed")
    assert "rate limit 3/hour reached" in failed["steps"][0]["error"]
    # Every refusal is the shared limit (which worker took which call does not matter),
    # and a refused call is recorded as such, at no cost.
    for r in runs:
        if r["status"] == "failed":
            assert "rate limit 3/hour reached" in r["steps"][0]["error"]
            [call] = api.client.get(f"/v1/runs/{r['id']}/tool-calls").json()
            assert (call["outcome"], call["cost_usd"].rstrip("0").rstrip(".")) == ("rate_limited", "0")


def test_llm_agent_usage_and_cost_reach_the_run(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, fake = runtime
    fake.script({"content": "Paris", "usage": {"prompt_tokens": 100, "completion_tokens": 10}})
    agent = {
        "type": "llm",
        "model": {"provider": "openai", "model": "house-model", "api_base": fake.api_base},
        "prompt": "Capital of {country}?",
    }
    _register(api, _one_step("ask", agent))
    run = api.wait(api.start("ask", {"country": "France"}), timeout=60)
    assert run["status"] == "succeeded", ([s["error"] for s in run["steps"]], cluster.logs())
    assert run["steps"][0]["output"]["content"] == "Paris"
    assert fake.requests[-1]["body"]["messages"][-1]["content"] == "Capital of France?"
    # 100 * $1000/M + 10 * $2000/M = $0.12, from the worker's price table
    assert run["usage"]["prompt_tokens"] == 100 and run["usage"]["completion_tokens"] == 10
    assert run["usage"]["cost_usd"].startswith("0.12")
    envelopes = api.client.get(f"/v1/runs/{run['id']}/envelopes").json()
    [result] = [e["envelope"] for e in envelopes if e["kind"] == "result"]
    assert result["usage"]["llm_calls"][0]["price_source"] == "config"


def test_llm_token_deltas_are_published_as_progress(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, fake = runtime
    fake.script({"content": "streamed answer in several pieces"})
    agent = {
        "type": "llm",
        "model": {"provider": "openai", "model": "house-model", "api_base": fake.api_base},
        "prompt": "Say something",
        "stream": True,
    }
    _register(api, _one_step("stream", agent))

    async def collect() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        nc = await nats.connect(cluster.env.services.nats_url)
        events: list[dict[str, Any]] = []
        names = Names(cluster.env.prefix)

        async def on(msg: Any) -> None:
            events.append(json.loads(msg.data))

        await nc.subscribe(f"{names.prefix}.progress.{api.tenant}.*", cb=on)
        run_id = await asyncio.to_thread(api.start, "stream", {})
        run = await asyncio.to_thread(api.wait, run_id, 60)
        await asyncio.sleep(0.3)
        await nc.close()
        return run, events

    run, events = asyncio.run(collect())
    assert run["status"] == "succeeded", ([s["error"] for s in run["steps"]], cluster.logs())
    deltas = "".join(e["data"]["delta"] for e in events if e["kind"] == "token" and e["run"] == run["id"])
    assert deltas == "streamed answer in several pieces"


def test_storage_agents_are_confined_to_the_tenant_workspace(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, _, _ = runtime
    spec = {
        "name": "files",
        "agents": {
            "write": {"type": "json_writer", "path": "out/{id}.json"},
            "read": {"type": "json_reader", "path": "out/{input.id}.json"},
        },
        "planner": {
            "type": "dag",
            "steps": [{"name": "w", "agent": "write"}, {"name": "r", "agent": "read", "depends_on": ["w"]}],
        },
    }
    _register(api, spec)
    run = api.wait(api.start("files", {"id": "abc", "value": 42}))
    assert run["status"] == "succeeded", run
    read = next(s for s in run["steps"] if s["state"] == "r")
    assert read["output"] == {"id": "abc", "value": 42}

    _register(api, _one_step("escape", {"type": "file_reader", "path": "../../etc/passwd"}))
    run = api.wait(api.start("escape", {}))
    assert run["status"] == "failed" and ".." in run["steps"][0]["error"]


def test_workers_register_and_heartbeat(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, _, _ = runtime
    deadline = time.monotonic() + 10
    while True:
        workers = api.client.get("/v1/workers").json()
        names = {w["id"] for w in workers if w["alive"]}
        if {"rt-1", "rt-2"} <= names or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"rt-1", "rt-2"} <= names, workers
    one = next(w for w in workers if w["id"] == "rt-1")
    assert one["queues"] == ["default"] and one["concurrency"] >= 1
    assert {"llm", "http", "tool", "greeter", "csv_reader"} <= set(one["agent_types"])
    first_seen = one["last_seen"]
    time.sleep(1.2)
    again = next(w for w in api.client.get("/v1/workers").json() if w["id"] == "rt-1")
    assert again["last_seen"] > first_seen  # still beating


def test_workers_list_needs_a_token(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, _, _ = runtime
    assert httpx.get(f"{api.url}/v1/workers").status_code == 401


def test_sigterm_drains_running_steps_then_deregisters(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, _ = runtime
    proc = cluster.worker(name="drainer", queue="drain", AGENTFLOW_WORKER_HEARTBEAT_S="0.5",
                          AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")  # fmt: skip
    _register(api, _one_step("slow", {"type": "sleep", "ms": 1500, "queue": "drain"}))
    run_id = api.start("slow", "x")
    deadline = time.monotonic() + 20
    while api.run(run_id)["status"] != "running":
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)
    proc.popen.send_signal(__import__("signal").SIGTERM)
    run = api.wait(run_id, timeout=20)
    assert run["status"] == "succeeded"
    assert run["steps"][0]["worker"] == "drainer" and run["steps"][0]["attempts"] == 1  # finished, not redelivered
    assert proc.popen.wait(20) == 0, cluster.logs()
    assert "drainer" not in {w["id"] for w in api.client.get("/v1/workers").json()}


def test_llm_calls_an_mcp_tool_through_the_registry(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, fake = runtime
    fake.script(
        {"tool_calls": [{"name": "calc__add", "arguments": {"a": 2, "b": 3}}]},
        {"content": "The sum is 5"},
    )
    agent = {
        "type": "llm",
        "model": {"provider": "openai", "model": "house-model", "api_base": fake.api_base},
        "prompt": "What is 2 + 3?",
        "tools": ["calc.add"],
    }
    _register(api, _one_step("mcp-sum", agent))
    before = len(fake.requests)
    run = api.wait(api.start("mcp-sum", {}), timeout=60)
    assert run["status"] == "succeeded", ([s["error"] for s in run["steps"]], cluster.logs())
    assert run["steps"][0]["output"]["content"] == "The sum is 5"
    first, second = fake.requests[before]["body"], fake.requests[before + 1]["body"]
    assert [t["function"]["name"] for t in first["tools"]] == ["calc__add"]
    tool_message = next(m for m in second["messages"] if m["role"] == "tool")
    assert "5" in tool_message["content"]
    [call] = api.client.get(f"/v1/runs/{run['id']}/tool-calls").json()
    assert (call["tool"], call["outcome"]) == ("calc.add", "ok")
    assert call["cost_usd"].startswith("0.5")


def test_every_llm_and_tool_call_lands_in_the_cost_ledger_and_the_audit_chain(
    runtime: tuple[Api, Cluster, FakeOpenAI],
) -> None:
    api, cluster, fake = runtime
    fake.script(
        {"tool_calls": [{"name": "calc__add", "arguments": {"a": 1, "b": 2}}],
         "usage": {"prompt_tokens": 120, "completion_tokens": 7}},
        {"content": "3", "usage": {"prompt_tokens": 150, "completion_tokens": 3}},
    )  # fmt: skip
    agent = {
        "type": "llm",
        "model": {"provider": "openai", "model": "house-model", "api_base": fake.api_base},
        "prompt": "What is 1 + 2?",
        "tools": ["calc.add"],
    }
    _register(api, _one_step("ledgered", agent))
    run = api.wait(api.start("ledgered", {}), timeout=60)
    assert run["status"] == "succeeded", ([s["error"] for s in run["steps"]], cluster.logs())
    costs = api.client.get("/v1/costs", params={"run": run["id"], "group_by": "model"}).json()
    groups = {g["key"]: g for g in costs["groups"]}
    assert set(groups) == {"openai/house-model", "tool:calc.add"}
    llm = groups["openai/house-model"]
    assert (llm["prompt_tokens"], llm["completion_tokens"], llm["llm_calls"]) == (270, 10, 2)
    # 270 * $1000/M + 10 * $2000/M = $0.29 exactly; the tool's cost_per_call is $0.50
    assert (llm["cost_usd"], groups["tool:calc.add"]["cost_usd"]) == ("0.29", "0.50")
    assert costs["total"]["cost_usd"] == "0.79" and costs["total"]["tool_calls"] == 1
    assert run["usage"]["cost_usd"].startswith("0.79")
    by_agent = api.client.get("/v1/costs", params={"run": run["id"], "group_by": "agent"}).json()
    assert [(g["key"], g["cost_usd"]) for g in by_agent["groups"]] == [("a", "0.79")]
    by_workflow = api.client.get("/v1/costs", params={"period": "month", "workflow": "ledgered"}).json()
    assert [g["key"] for g in by_workflow["groups"]] == ["ledgered"]
    bad = api.client.get("/v1/costs", params={"period": "year"})
    assert bad.status_code == 422 and "period" in bad.text

    [call] = api.client.get(f"/v1/runs/{run['id']}/tool-calls").json()
    deadline = time.monotonic() + 15  # entries are sealed into the chain within ~0.2 s
    while api.client.get("/v1/audit/verify").json()["pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    audit = api.client.get("/v1/audit", params={"run": run["id"], "action": "tool.called"}).json()["entries"]
    assert [(e["data"]["tool"], e["data"]["input_hash"], e["data"]["cost_usd"]) for e in audit] == [
        ("calc.add", call["input_hash"], "0.5")
    ]
    assert audit[0]["actor"].startswith("worker:rt-")

    # The CLI prints the same numbers.
    token = api.client.headers["Authorization"].split()[1]
    env = {**os.environ, "AGENTFLOW_API_URL": api.url, "AGENTFLOW_TOKEN": token, "COLUMNS": "200"}
    shown = subprocess.run([sys.executable, "-m", "agentflow_cli", "costs", "--period", "today", "--by", "model"],
                           capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "openai/house-model" in shown.stdout and "tool:calc.add" in shown.stdout
    checked = subprocess.run([sys.executable, "-m", "agentflow_cli", "audit", "verify"],
                             capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert checked.returncode == 0 and "yes" in checked.stdout, checked.stdout + checked.stderr


def test_dry_run_estimates_the_dispatches_the_run_then_makes(runtime: tuple[Api, Cluster, FakeOpenAI]) -> None:
    api, cluster, fake = runtime
    model = {"provider": "openai", "model": "house-model", "api_base": fake.api_base, "max_tokens": 50}
    spec = {
        "name": "estimated",
        "agents": {
            "draft": {"type": "llm", "model": model, "prompt": "Write about {topic}."},
            "check": {"type": "echo"},
            "polish": {"type": "llm", "model": model, "prompt": "Polish the draft."},
        },
        "planner": {
            "type": "fsm",
            "initial_state": "draft",
            "states": {
                "draft": {"on_success": "check"},
                "check": {"on_success": "polish"},
                "polish": {"on_success": "done"},
            },
            "final_states": ["done"],
        },
    }
    _register(api, spec)
    runs_before = len(api.client.get("/v1/runs", params={"workflow": "estimated"}).json())
    dry = api.client.post(
        "/v1/runs", params={"dry_run": "true"}, json={"workflow": "estimated", "input": {"topic": "tea"}}
    )
    assert dry.status_code == 200, dry.text
    estimate = dry.json()["estimate"]
    assert dry.json()["dry_run"] is True and dry.json()["version"] == 1
    assert len(api.client.get("/v1/runs", params={"workflow": "estimated"}).json()) == runs_before  # nothing started
    assert [s["agent"] for s in estimate["steps"]] == ["draft", "check", "polish"]
    assert estimate["expected_steps"] == 3 and estimate["bounded"] is True
    llm_steps = [s for s in estimate["steps"] if s["agent_type"] == "llm"]
    # completion at max_tokens (no history yet), priced from the control plane's table
    assert all(s["completion_tokens"] == 50 and s["price_known"] for s in llm_steps)
    for s in llm_steps:
        assert s["cost_usd"] == pytest.approx((s["prompt_tokens"] * 1000 + 50 * 2000) / 1e6, rel=1e-6)
    assert estimate["expected_cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in estimate["steps"]), rel=1e-9)

    fake.script({"content": "draft", "usage": {"prompt_tokens": 12, "completion_tokens": 40}},
                {"content": "polished", "usage": {"prompt_tokens": 9, "completion_tokens": 30}})  # fmt: skip
    run = api.wait(api.start("estimated", {"topic": "tea"}), timeout=60)
    assert run["status"] == "succeeded", ([s["error"] for s in run["steps"]], cluster.logs())
    assert [s["agent"] for s in run["steps"]] == [s["agent"] for s in estimate["steps"]]
    stored = run["estimate"]
    assert [s["agent"] for s in stored["steps"]] == ["draft", "check", "polish"]
    if stored["notes"] == estimate["notes"]:  # same token counter (litellm loads in the background)
        assert stored["expected_tokens"] == estimate["expected_tokens"]

    missing = api.client.post("/v1/runs", params={"dry_run": "true"}, json={"workflow": "nope"})
    assert missing.status_code == 404
