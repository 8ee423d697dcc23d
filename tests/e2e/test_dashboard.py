"""The operator dashboard at /ui in a real browser (Debian's Chromium driven by Playwright)
against the shared stack: a real control plane, two workers, Postgres and NATS; only the
model behind the LLM step is the fake OpenAI server.

Screenshots land in docs/img/ (docs/dashboard.md shows them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_llm import FakeOpenAI
from tests.support.processes import Api, Cluster
from tests.support.services import TestEnv

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
#: without the networking flags Chromium keeps dialling Google's hosts, which this
#: machine's closed network refuses; the sandbox needs user namespaces root lacks here
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
SLOW = 30_000  # ms: waiting for a run of a few seconds, on a loaded machine

TRIAGE = """
name: ticket-triage
agents:
  fetch:    {type: sleep, ms: 2500}
  classify: {type: fail, times: 1, retry: {max_attempts: 2, backoff_ms: 200}}
  summarize:
    type: llm
    model: {provider: openai, model: gpt-4o-mini, api_base: "%s", max_tokens: 60}
    prompt: "Summarize the ticket."
planner:
  type: fsm
  initial_state: fetch
  states:
    fetch:     {agent: fetch, on_success: classify, on_error: failed}
    classify:  {agent: classify, on_success: summarize, on_error: failed}
    summarize: {agent: summarize, on_success: done, on_error: failed}
  final_states: [done, failed]
"""

BT = """
name: bt-demo
agents:
  fetch: {type: echo}
  flaky: {type: fail, times: 1}
  score: {type: constant, output: {score: 0.93}}
  slow: {type: sleep, ms: 5000}
  quick: {type: sleep, ms: 50}
  approve: {type: constant, output: {approved: true}}
  escalate: {type: constant, output: {approved: false, reason: needs a human}}
planner:
  type: behavior_tree
  root:
    type: sequence
    children:
      - {type: action, agent: fetch, input: {text: input.text}}
      - {type: condition, check: "size(fetch.text) > 0"}
      - type: parallel
        children:
          - type: fallback
            children:
              - {type: action, agent: flaky}
              - {type: action, agent: score, name: rate}
          - type: fallback
            children:
              - type: timeout
                seconds: 1
                child: {type: action, agent: slow}
              - {type: action, agent: quick}
      - type: conditional_selector
        conditions:
          - expression: "rate.score > 0.9"
            child: {type: action, agent: approve}
          - default: true
            child: {type: action, agent: escalate}
"""

DAG = """
name: market-report
agents:
  collect: {type: constant, output: {signals: ["market_gap", "pricing"], score: 7}}
  analyze: {type: sleep, ms: 300}
  deep_dive: {type: sleep, ms: 200}
  social: {type: fail, times: 1, retry: {max_attempts: 2}}
  report: {type: echo}
planner:
  type: dag
  steps:
    - name: collect
    - name: analyze
      depends_on: [collect]
    - name: deep_dive
      depends_on: [analyze]
      condition: "collect.score > 5"
    - name: social
      depends_on: [collect]
      condition: "collect.score > 50"
    - name: report
      depends_on: [deep_dive, social]
"""

EXPORT = """
name: nightly-export
agents:
  export: {type: failure, message: "warehouse refused the connection"}
planner:
  type: fsm
  initial_state: export
  states:
    export: {agent: export, on_success: done}
  final_states: [done]
"""

#: what the fake model answers the LLM planner (each reply answers only its model)
PLAN: dict[str, list[dict[str, Any]]] = {
    "steps": [
        {"name": "find", "agent": "search"},
        {"name": "digest", "agent": "summarize", "depends_on": ["find"]},
        {"name": "draft", "agent": "write", "depends_on": ["digest"]},
    ]
}


def research(name: str, api_base: str) -> dict[str, Any]:
    """An LLM-planned workflow with a DAG fallback (for when no plan comes back)."""
    return {
        "name": name,
        "agents": {"search": {"type": "constant", "output": {"sources": ["a.example"]}}, "summarize": {"type": "echo"},
                   "write": {"type": "echo"}},
        "planner": {
            "type": "llm", "model": {"model": "planner-model", "api_base": api_base, "max_tokens": 512}, "max_steps": 6,
            "fallback": {"type": "dag", "steps": [{"name": "search"}, {"name": "write", "depends_on": ["search"]}]},
        },
    }  # fmt: skip


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0 and shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (not root, no apt-get): install Chromium")
    pytest.fail(f"{CHROMIUM} is missing: run `make browser-deps` (`make install` does it when it is missing)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=10_000)
    IMG.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        # A second's thought per answer, so a run is still going when the page opens.
        fake.script(
            {"model": "gpt-4o-mini", "content": "Customer cannot log in; reset link expired. Resend it.", "delay": 1.0},
            {"model": "planner-model", "content": json.dumps(PLAN)},
        )
        yield fake


def _token(api: Api) -> str:
    return str(api.client.headers["Authorization"]).removeprefix("Bearer ")


@pytest.fixture(scope="module")
def ops(cluster: tuple[Cluster, str], shared_env: TestEnv, fake_llm: FakeOpenAI) -> Api:
    """The operator's tenant, shared by this module's tests (costs add up over them)."""
    api = Api(cluster[1], shared_env, f"dash-{secrets.token_hex(3)}")
    # Port 9 (discard) refuses connections: no plan comes back, the fallback takes over.
    specs: list[str | dict[str, Any]] = [
        TRIAGE % fake_llm.api_base, BT, DAG, EXPORT,
        research("research", fake_llm.api_base), research("research-offline", "http://127.0.0.1:9/v1"),
    ]  # fmt: skip
    for spec in specs:
        response = api.put_workflow(spec)
        assert response.status_code == 200, response.text
    return api


@pytest.fixture(scope="module")
def other(cluster: tuple[Cluster, str], shared_env: TestEnv) -> Api:
    api = Api(cluster[1], shared_env, f"dash-other-{secrets.token_hex(3)}")
    assert api.put_workflow(BT).status_code == 200
    return api


@pytest.fixture
def page(browser: Any, ops: Api) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def sign_in(page: Any, api: Api) -> None:
    page.goto(f"{api.url}/ui/")
    page.fill("#token", _token(api))
    page.click("#signin-button")
    page.wait_for_selector("#tenant")


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


# --- serving and signing in ---------------------------------------------------------------


def test_dashboard_is_served_with_a_strict_policy_and_needs_no_credentials(ops: Api) -> None:
    with httpx.Client(base_url=ops.url) as anonymous:
        moved = anonymous.get("/ui")
        assert moved.status_code == 307 and moved.headers["location"].endswith("/ui/")
        index = anonymous.get("/ui/")
        assert index.status_code == 200 and 'src="js/app.js"' in index.text
        policy = index.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert index.headers["x-frame-options"] == "DENY"
        script = anonymous.get("/ui/js/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        # The pages grant nothing: the API behind them still wants a token.
        assert anonymous.get("/v1/runs").status_code == 401


def test_sign_in_refuses_a_bad_token_and_keeps_a_good_one_for_the_tab_only(page: Any, ops: Api) -> None:
    page.goto(f"{ops.url}/ui/")
    page.fill("#token", "not-a-token")
    page.click("#signin-button")
    expect(page.locator("#signin-error")).to_contain_text("The server refused the token: malformed token")
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#token", _token(ops))
    page.click("#signin-button")
    expect(page.locator("#tenant")).to_contain_text(ops.tenant)
    assert page.evaluate("sessionStorage.getItem('agentflow.token')") == _token(ops)
    assert page.evaluate("localStorage.length") == 0
    page.click("#signout")
    expect(page.locator("#token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


# --- runs -----------------------------------------------------------------------------------


def test_runs_list_follows_runs_live_and_shows_no_other_tenant(page: Any, ops: Api, other: Api) -> None:
    sign_in(page, ops)
    page.goto(f"{ops.url}/ui/#/runs")
    expect(page.locator(".live")).to_have_attribute("data-state", "live", timeout=10_000)
    page.evaluate("window.__sameDocument = true")
    theirs = other.start("bt-demo", {"text": "not yours"})
    mine = ops.start("ticket-triage", {"ticket": 101})
    row = page.locator(f'tr[data-run="{mine}"]')
    # The row comes from the run.created event and changes with the run, no reload.
    expect(row).to_have_attribute("data-status", re.compile("pending|running"), timeout=10_000)
    expect(row).to_have_attribute("data-status", "succeeded", timeout=SLOW)
    expect(row.locator(".status .badge")).to_have_text("succeeded")
    assert page.evaluate("window.__sameDocument") is True
    assert other.wait(theirs)["status"] == "succeeded"
    assert page.locator(f'tr[data-run="{theirs}"]').count() == 0

    # Filters narrow the list (and live in the address, so a reload keeps them).
    page.select_option("#filter-status", "failed")
    expect(page.locator("#runs-table tbody tr")).to_have_count(0)
    page.goto(f"{ops.url}/ui/#/runs?workflow=ticket-triage&status=succeeded")
    expect(page.locator(f'tr[data-run="{mine}"]')).to_be_visible()
    # Another tenant's run, asked for by id, is simply not there.
    page.goto(f"{ops.url}/ui/#/runs/{theirs}")
    expect(page.locator("#run-head h1")).to_have_text("Run not found")


def test_run_page_follows_a_run_live_to_completion(page: Any, ops: Api) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, ops)
    run_id = ops.start("ticket-triage", {"ticket": 202})
    page.goto(f"{ops.url}/ui/#/runs/{run_id}")
    page.evaluate("window.__sameDocument = true")
    status = page.locator("#run-status .badge")
    expect(status).to_have_attribute("data-status", "running", timeout=10_000)
    expect(page.locator("h2 .live")).to_have_attribute("data-state", re.compile("live|ended"))
    # While it runs, the FSM's current state is highlighted in the drawing...
    expect(page.locator('#graph g.node[data-key="fetch"]')).to_have_class(re.compile(r"\bst-current\b"))
    # ...and moves on, until the final state.
    expect(status).to_have_attribute("data-status", "succeeded", timeout=SLOW)
    done = page.locator('#graph g.node[data-key="done"]')
    expect(done).to_have_class(re.compile(r"\bst-current\b.*\bst-succeeded\b|\bst-succeeded\b.*\bst-current\b"))
    expect(page.locator("#plan-summary")).to_have_text("final state: done")
    expect(page.locator('#graph g.node[data-key="failed"]')).not_to_have_class(re.compile(r"\bst-"))
    # start → fetch → classify → summarize → done
    expect(page.locator("#graph g.edge.taken")).to_have_count(4)

    # The timeline: three steps, the retried one with both attempts and its worker.
    expect(page.locator("#timeline tr.step")).to_have_count(3)
    classify = page.locator('#timeline tr.step[data-step="classify"]')
    expect(classify.locator("td").nth(3)).to_have_text("2/2")
    expect(classify).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#timeline tr.attempt")).to_have_count(2)
    run = ops.run(run_id)
    for step in run["steps"]:
        expect(page.locator(f'#timeline tr.step[data-step="{step["state"]}"]')).to_contain_text(step["worker"])
    expect(page.locator('#timeline tr.step[data-step="summarize"] td').last).not_to_have_text("—")
    assert run["usage"]["cost_usd"] != "0"
    expect(page.locator("#run-cost")).not_to_have_text("$0")

    # The event log got the whole story from the stream.
    for kind in ("run.created", "step.scheduled", "step.failed", "step.succeeded", "cost.recorded", "run.succeeded"):
        expect(page.locator(f'#events tr[data-type="{kind}"]').first).to_be_visible()

    # Every envelope is listed with its hash, and the page recomputed each hash.
    envelopes = ops.client.get(f"/v1/runs/{run_id}/envelopes").json()
    expect(page.locator("#envelopes tr.envelope")).to_have_count(len(envelopes))
    expect(page.locator("#envelopes .verified")).to_have_count(len(envelopes))
    assert page.locator("#envelopes .mismatch").count() == 0
    for envelope in envelopes:
        expect(page.locator("#envelopes .hash", has_text=envelope["hash"])).to_have_count(1)

    assert page.evaluate("window.__sameDocument") is True
    page.screenshot(path=str(IMG / "dashboard-run.png"))
    # Nothing was fetched from anywhere but the control plane.
    origin = ops.url.removeprefix("http://")
    assert requested and all(re.match(rf"(http|ws)://{re.escape(origin)}/", url) for url in requested), requested


def test_plans_of_a_behavior_tree_and_a_dag_are_drawn_with_their_progress(page: Any, ops: Api) -> None:
    sign_in(page, ops)
    tree = ops.start("bt-demo", {"text": "hello"})
    dag = ops.start("market-report", {"topic": "tea"})
    assert ops.wait(tree)["status"] == "succeeded" and ops.wait(dag)["status"] == "succeeded"

    page.goto(f"{ops.url}/ui/#/runs/{tree}")
    expect(page.locator("#run-status .badge")).to_have_attribute("data-status", "succeeded")
    node = page.locator("#graph g.node")
    expect(node.filter(has_text="agent: flaky")).to_have_attribute("data-status", "failed")
    expect(page.locator('#graph g.node[data-step="rate"]')).to_have_attribute("data-status", "succeeded")
    expect(node.filter(has_text="agent: slow")).to_have_attribute("data-status", "cancelled")
    expect(node.filter(has_text="agent: escalate")).to_have_attribute("data-status", "")
    # Every step the planner ran is a node of the drawing (steps name BT nodes by name or path).
    for step in ops.run(tree)["steps"]:
        expect(page.locator(f'#graph g.node[data-step="{step["state"]}"]')).to_have_count(1)
    page.screenshot(path=str(IMG / "dashboard-run-bt.png"))

    page.goto(f"{ops.url}/ui/#/runs/{dag}")
    expect(page.locator("#plan-summary")).to_have_text("5 of 5 steps finished")
    for name, status in (("collect", "succeeded"), ("analyze", "succeeded"), ("deep_dive", "succeeded"),
                         ("social", "skipped"), ("report", "succeeded")):  # fmt: skip
        expect(page.locator(f'#graph g.node[data-key="{name}"]')).to_have_attribute("data-status", status)
    page.screenshot(path=str(IMG / "dashboard-run-dag.png"))


def test_llm_plan_and_fallback_plan_are_drawn_with_their_progress(page: Any, ops: Api) -> None:
    planned = ops.start("research", {"goal": "Compare two tea importers"})
    offline = ops.start("research-offline", {"goal": "Compare two tea importers"})
    assert ops.wait(planned)["status"] == "succeeded"
    assert ops.wait(offline, timeout=SLOW / 1000)["status"] == "succeeded"
    sign_in(page, ops)

    # The model's plan joins the drawing below the planner node once it is accepted.
    page.goto(f"{ops.url}/ui/#/runs/{planned}")
    expect(page.locator("#plan-summary")).to_have_text("plan: 3 of 3 steps finished")
    expect(page.locator('#graph g.node[data-shape="planner"]')).to_have_attribute("data-status", "succeeded")
    for step in PLAN["steps"]:
        expect(page.locator(f'#graph g.node[data-key="{step["name"]}"]')).to_have_attribute("data-status", "succeeded")

    # No plan: the planner node failed and the fallback DAG ran.
    page.goto(f"{ops.url}/ui/#/runs/{offline}")
    expect(page.locator("#plan-summary")).to_have_text("fallback plan 1 · 2 of 2 steps finished")
    expect(page.locator('#graph g.node[data-shape="planner"]')).to_have_attribute("data-status", "failed")
    for name in ("search", "write"):
        expect(page.locator(f'#graph g.node[data-key="{name}"]')).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#graph g.edge.dashed.taken")).to_have_count(1)


def test_cancelling_a_run_from_its_page(page: Any, ops: Api) -> None:
    sign_in(page, ops)
    run_id = ops.start("ticket-triage", {"ticket": 505})
    page.goto(f"{ops.url}/ui/#/runs/{run_id}")
    expect(page.locator("#run-status .badge")).to_have_attribute("data-status", "running")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-run")
    expect(page.locator("#run-status .badge")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#cancel-run")).to_have_count(0)
    assert ops.run(run_id)["status"] == "cancelled"
    expect(page.locator('#events tr[data-type="run.cancelled"]')).to_have_count(1)


# --- workers, costs, audit ------------------------------------------------------------------


def test_workers_page_lists_the_workers_and_their_queues(page: Any, ops: Api) -> None:
    sign_in(page, ops)
    page.goto(f"{ops.url}/ui/#/workers")
    for name in ("shared-1", "shared-2"):
        expect(page.locator(f'tr[data-worker="{name}"]')).to_have_attribute("data-alive", "true")
    expect(page.locator('#queues tr[data-queue="default"]')).to_contain_text("2 of 2")
    page.screenshot(path=str(IMG / "dashboard-workers.png"), full_page=True)


def test_costs_page_shows_spend_by_workflow_agent_and_model(page: Any, ops: Api) -> None:
    run_id = ops.start("ticket-triage", {"ticket": 303})
    assert ops.wait(run_id, timeout=SLOW / 1000)["status"] == "succeeded"
    costs = ops.client.get("/v1/costs", params={"period": "today", "group_by": "workflow"}).json()
    assert float(costs["total"]["cost_usd"]) > 0
    budget = {
        "scope": "workflow",
        "target": "ticket-triage",
        "period": "day",
        "limit_usd": "0.001",
        "enforcement": "soft",
    }
    assert ops.client.put("/v1/budgets/triage-daily", json=budget).status_code == 201
    sign_in(page, ops)
    page.goto(f"{ops.url}/ui/#/costs")
    expect(page.locator("#total-cost")).to_have_attribute("title", f"${costs['total']['cost_usd']}")
    workflow = page.locator('#costs-by-workflow tr[data-key="ticket-triage"]')
    expect(workflow).to_be_visible()
    spent = next(g["cost_usd"] for g in costs["groups"] if g["key"] == "ticket-triage")
    expect(workflow.locator("td").nth(1)).to_have_attribute("title", f"${spent}")
    expect(page.locator('#costs-by-agent tr[data-key="summarize"]')).to_be_visible()
    expect(page.locator('#costs-by-model tr[data-key="openai/gpt-4o-mini"]')).to_be_visible()
    expect(page.locator('#budgets tr[data-budget="triage-daily"]')).to_contain_text("workflow ticket-triage")
    page.screenshot(path=str(IMG / "dashboard-costs.png"), full_page=True)
    page.select_option("#period", "month")
    expect(page.locator("#period")).to_have_value("month")
    expect(page.locator('#costs-by-workflow tr[data-key="ticket-triage"]')).to_be_visible()


def test_audit_page_verifies_the_chain(page: Any, ops: Api) -> None:
    verified = ops.client.get("/v1/audit/verify").json()
    assert verified["ok"] and verified["length"] > 0
    sign_in(page, ops)
    page.goto(f"{ops.url}/ui/#/audit")
    expect(page.locator("#audit-verdict")).to_have_text("The audit chain verifies")
    expect(page.locator("#audit-status .audit-status")).to_have_attribute("data-ok", "true")
    expect(page.locator("#audit-entries tbody tr").first).to_be_visible()
    page.screenshot(path=str(IMG / "dashboard-audit.png"))


def test_runs_list_shows_what_the_api_lists(page: Any, ops: Api) -> None:
    """Last, so the list has the runs of every test above, plus a failed and a running one."""
    failed = ops.start("nightly-export", {"day": "2026-11-20"})
    assert ops.wait(failed)["status"] == "failed"
    running = ops.start("ticket-triage", {"ticket": 404})
    listed = ops.client.get("/v1/runs").json()
    assert len(listed) >= 7
    sign_in(page, ops)
    page.goto(f"{ops.url}/ui/#/runs")
    rows = page.locator("#runs-table tbody tr")
    expect(rows).to_have_count(len(listed))
    for i, run in enumerate(listed):  # newest first, as the API sorts them
        expect(rows.nth(i)).to_have_attribute("data-run", run["id"])
        if run["id"] != running:
            expect(rows.nth(i)).to_have_attribute("data-status", run["status"])
    expect(page.locator(f'tr[data-run="{failed}"]')).to_contain_text("warehouse refused the connection")
    expect(page.locator(f'tr[data-run="{running}"]')).to_have_attribute("data-status", "running")
    page.screenshot(path=str(IMG / "dashboard-runs.png"), full_page=True)
    expect(page.locator(f'tr[data-run="{running}"]')).to_have_attribute("data-status", "succeeded", timeout=SLOW)


# --- the graph endpoint ---------------------------------------------------------------------


def test_workflow_graph_endpoint(ops: Api, other: Api) -> None:
    graph = ops.client.get("/v1/workflows/ticket-triage/graph").json()
    assert graph["workflow"] == "ticket-triage" and graph["version"] == 1 and graph["planner"] == "fsm"
    keys = {n["key"]: n for n in graph["nodes"]}
    assert set(keys) == {None, "fetch", "classify", "summarize", "done", "failed"}
    assert keys[None]["shape"] == "start" and keys["done"]["shape"] == "final"
    ids = {n["id"]: n["key"] for n in graph["nodes"]}
    edges = {(ids[e["src"]], ids[e["dst"]], e["label"]) for e in graph["edges"]}
    assert (None, "fetch", None) in edges and ("summarize", "done", "success") in edges
    assert ("classify", "failed", "error") in edges

    tree = ops.client.get("/v1/workflows/bt-demo/graph", params={"version": 1}).json()
    # Keys are the planner's preorder indexes; steps are node names, else paths.
    by_key = {n["key"]: n for n in tree["nodes"] if n["key"] is not None}
    assert by_key["0"]["step"] == "root" and by_key["0"]["shape"] == "control"
    assert by_key["1"]["step"] == "root/0" and "agent: fetch" in by_key["1"]["label"]
    assert any(n["step"] == "rate" for n in tree["nodes"])

    missing = ops.client.get("/v1/workflows/nope/graph")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert ops.client.get("/v1/workflows/ticket-triage/graph", params={"version": 9}).status_code == 404
    bad = ops.client.get("/v1/workflows/ticket-triage/graph", params={"version": 0})
    assert bad.status_code == 422 and "version" in bad.text
    # Another tenant's workflow of the same name is not this tenant's.
    assert other.client.get("/v1/workflows/ticket-triage/graph").status_code == 404
    assert httpx.get(f"{ops.url}/v1/workflows/ticket-triage/graph").status_code == 401
