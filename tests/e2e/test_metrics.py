"""Prometheus metrics end to end: a real control plane and worker on real Postgres and
NATS (the fake model server is the only simulated part), read through ``/metrics`` the way
Prometheus reads them; and the Grafana dashboard checked against what a real scrape holds."""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_llm import FakeOpenAI
from tests.support.processes import Api, Cluster, Proc, free_port
from tests.support.services import Services, TestEnv

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "agentflow.json"
PRICES = {"house-model": {"input_per_million": 1000, "output_per_million": 2000}}


class Stack:
    def __init__(self, cluster: Cluster, url: str, env: TestEnv, fake: FakeOpenAI) -> None:
        self.cluster, self.url, self.env, self.fake = cluster, url, env, fake
        self.shared: dict[str, str] = {"AGENTFLOW_LLM_PRICES": json.dumps(PRICES)}
        #: metrics URL of the worker on the default queue
        self.default_metrics = ""

    def worker(self, name: str, queue: str = "default") -> tuple[Proc, str]:
        port = free_port()
        proc = self.cluster.worker(name=name, queue=queue, AGENTFLOW_WORKER_METRICS_PORT=str(port),
                                   AGENTFLOW_WORKER_HEARTBEAT_S="0.3", AGENTFLOW_WORKER_CONCURRENCY="4",
                                   **self.shared)  # fmt: skip
        return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stack(services: Services) -> Iterator[Stack]:
    env = TestEnv.create(services)
    cluster = Cluster(env)
    fake = FakeOpenAI().__enter__()
    try:
        stack = Stack(cluster, "", env, fake)
        _, stack.url = cluster.control_plane(
            AGENTFLOW_METRICS_COLLECT_INTERVAL_S="0.25", AGENTFLOW_LLM_PRICES=stack.shared["AGENTFLOW_LLM_PRICES"]
        )
        _, stack.default_metrics = stack.worker("mw-default")
        wait_for(lambda: _responds(stack.default_metrics), bool, "worker metrics endpoint")
        yield stack
    finally:
        fake.__exit__(None, None, None)
        cluster.close()
        env.destroy()


@pytest.fixture
def api(stack: Stack) -> Api:
    return Api(stack.url, stack.env, f"met-{secrets.token_hex(4)}")


# --- reading /metrics ---------------------------------------------------------------------

Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Sample:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Sample, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Sample, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def wait_for(read: Callable[[], Any], ok: Callable[[Any], bool], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = read()
        if ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: last value {got!r}")
        time.sleep(0.1)


def _responds(url: str) -> bool:
    try:
        return httpx.get(f"{url}/metrics", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def gauge(url: str, name: str, **labels: str) -> Callable[[], float | None]:
    return lambda: value(scrape(url), name, **labels)


def _register(api: Api, spec: dict[str, Any]) -> None:
    response = api.put_workflow(spec)
    assert response.status_code == 200, response.text


def _one_step(name: str, agent: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "agents": {"a": agent},
        "planner": {"type": "fsm", "initial_state": "a", "states": {"a": {"on_success": "done"}},
                    "final_states": ["done"]},
    }  # fmt: skip


# --- queues and workers -------------------------------------------------------------------


def test_queue_depth_and_oldest_pending_age_rise_while_nobody_consumes_then_drain(api: Api, stack: Stack) -> None:
    queue = f"mq-{secrets.token_hex(3)}"
    _register(api, _one_step("backlog", {"type": "echo", "queue": queue}))
    url = stack.url
    runs = [api.start("backlog", {"n": i}) for i in range(3)]

    # No worker has ever consumed this queue: there is no consumer, the stream still knows.
    wait_for(gauge(url, "agentflow_queue_depth", queue=queue), lambda v: v == 3, "depth of the unconsumed queue")
    first = wait_for(gauge(url, "agentflow_queue_oldest_pending_age_seconds", queue=queue), lambda v: v and v > 0,
                     "oldest pending age")  # fmt: skip
    wait_for(gauge(url, "agentflow_queue_oldest_pending_age_seconds", queue=queue), lambda v: v >= first + 1.0,
             "oldest pending age growing")  # fmt: skip
    samples = scrape(url)
    assert (value(samples, "agentflow_queue_oldest_unacked_age_seconds", queue=queue) or 0) >= first + 1.0
    assert value(samples, "agentflow_queue_workers", queue=queue) is None

    worker, worker_url = stack.worker(f"mw-{queue}", queue=queue)
    assert all(api.wait(r)["status"] == "succeeded" for r in runs)
    wait_for(lambda: scrape(url), lambda s: value(s, "agentflow_queue_depth", queue=queue) == 0
             and value(s, "agentflow_queue_oldest_pending_age_seconds", queue=queue) == 0
             and value(s, "agentflow_queue_oldest_unacked_age_seconds", queue=queue) == 0
             and value(s, "agentflow_queue_workers", queue=queue) == 1, "drained queue with one worker")  # fmt: skip
    assert value(scrape(worker_url), "agentflow_worker_concurrency", queue=queue) == 4

    # The queue's consumer now exists: a backlog is read from it once the worker is gone,
    # and the drained worker's series leave the control plane's metrics.
    worker.kill(signal.SIGTERM)
    wait_for(lambda: series(scrape(url), "agentflow_worker_heartbeat_inflight_steps"),
             lambda s: all(x["worker"] != f"mw-{queue}" for x in s), "stopped worker's series removed")  # fmt: skip
    assert value(scrape(url), "agentflow_queue_workers", queue=queue) is None
    later = [api.start("backlog", {"n": i}) for i in range(2)]
    wait_for(gauge(url, "agentflow_queue_depth", queue=queue), lambda v: v == 2, "depth from the consumer")
    samples = wait_for(lambda: scrape(url),
                       lambda s: (value(s, "agentflow_queue_oldest_pending_age_seconds", queue=queue) or 0) > 0.5,
                       "oldest pending age from the consumer")  # fmt: skip
    assert value(samples, "agentflow_queue_ack_pending", queue=queue) == 0
    stack.worker(f"mw-{queue}-2", queue=queue)
    assert all(api.wait(r)["status"] == "succeeded" for r in later)
    wait_for(gauge(url, "agentflow_queue_depth", queue=queue), lambda v: v == 0, "drained again")


def test_in_flight_steps_per_worker_on_the_worker_and_the_control_plane(api: Api, stack: Stack) -> None:
    _register(api, _one_step("naps", {"type": "sleep", "ms": 3000}))
    worker_url = stack.default_metrics
    runs = [api.start("naps", {}) for _ in range(2)]
    wait_for(gauge(worker_url, "agentflow_worker_inflight_steps"), lambda v: v == 2, "worker's own gauge")
    samples = wait_for(lambda: scrape(stack.url),
                       lambda s: value(s, "agentflow_worker_heartbeat_inflight_steps", worker="mw-default",
                                       queue="default") == 2, "in-flight from the heartbeat")  # fmt: skip
    assert value(samples, "agentflow_worker_heartbeat_concurrency", worker="mw-default", queue="default") == 4
    assert value(scrape(worker_url), "agentflow_worker_concurrency", queue="default") == 4
    # Running steps are unacknowledged but no longer waiting.
    samples = wait_for(lambda: scrape(stack.url),
                       lambda s: value(s, "agentflow_queue_ack_pending", queue="default") == 2
                       and (value(s, "agentflow_queue_oldest_unacked_age_seconds", queue="default") or 0) > 0.5,
                       "running steps as ack-pending")  # fmt: skip
    assert value(samples, "agentflow_queue_oldest_pending_age_seconds", queue="default") == 0
    assert value(samples, "agentflow_queue_depth", queue="default") == 2
    assert all(api.wait(r)["status"] == "succeeded" for r in runs)
    wait_for(gauge(worker_url, "agentflow_worker_inflight_steps"), lambda v: v == 0, "worker idle again")
    wait_for(gauge(stack.url, "agentflow_worker_heartbeat_inflight_steps", worker="mw-default", queue="default"),
             lambda v: v == 0, "heartbeat idle again")  # fmt: skip


# --- budgets and audit --------------------------------------------------------------------


def test_budget_remaining_drops_after_spend_and_per_run_budgets_are_not_exported(api: Api, stack: Stack) -> None:
    fake = stack.fake
    fake.script({"content": "hi", "usage": {"prompt_tokens": 10, "completion_tokens": 50}})
    model = {"provider": "openai", "model": "house-model", "api_base": fake.api_base, "max_tokens": 100}
    _register(api, _one_step("spender", {"type": "llm", "model": model, "prompt": "Say hi."}))
    put = api.client.put
    assert put("/v1/budgets/daily", json={"scope": "tenant", "period": "day", "limit_usd": "5",
                                          "limit_tokens": 1000}).status_code == 201  # fmt: skip
    assert put("/v1/budgets/wf-month", json={"scope": "workflow", "target": "spender", "period": "month",
                                             "limit_usd": "1.5", "enforcement": "soft"}).status_code == 201  # fmt: skip
    assert put("/v1/budgets/per-run", json={"scope": "run", "period": "run", "limit_usd": "1"}).status_code == 201
    t = api.tenant
    samples = wait_for(lambda: scrape(stack.url),
                       lambda s: value(s, "agentflow_budget_remaining_usd", tenant=t, budget="wf-month") == 1.5,
                       "budgets exported")  # fmt: skip
    assert value(samples, "agentflow_budget_remaining_usd", tenant=t, budget="daily") == 5.0
    assert value(samples, "agentflow_budget_limit_usd", tenant=t, budget="daily") == 5.0
    assert value(samples, "agentflow_budget_remaining_tokens", tenant=t, budget="daily") == 1000
    assert value(samples, "agentflow_budget_limit_tokens", tenant=t, budget="daily") == 1000
    assert value(samples, "agentflow_budget_remaining_tokens", tenant=t, budget="wf-month") is None  # no token limit

    assert api.wait(api.start("spender", {}), timeout=60)["status"] == "succeeded"
    # $0.11 and 60 tokens spent, and nothing reserved any more once the run is over.
    samples = wait_for(lambda: scrape(stack.url),
                       lambda s: value(s, "agentflow_budget_remaining_usd", tenant=t, budget="daily") == 4.89
                       and value(s, "agentflow_budget_remaining_usd", tenant=t, budget="wf-month") == 1.39,
                       "remaining after the spend")  # fmt: skip
    assert value(samples, "agentflow_budget_remaining_tokens", tenant=t, budget="daily") == 940
    exported = {x["budget"] for name in ("agentflow_budget_remaining_usd", "agentflow_budget_limit_usd")
                for x in series(samples, name) if x["tenant"] == t}  # fmt: skip
    assert exported == {"daily", "wf-month"}

    assert api.client.delete("/v1/budgets/daily").status_code == 204
    wait_for(gauge(stack.url, "agentflow_budget_remaining_usd", tenant=t, budget="daily"), lambda v: v is None,
             "deleted budget's series removed")  # fmt: skip


def test_audit_chain_length_follows_the_chain(api: Api, stack: Stack) -> None:
    def verified_length() -> int:
        body = wait_for(lambda: api.client.get("/v1/audit/verify").json(), lambda b: b["pending"] == 0, "sealed")
        assert body["ok"] is True
        return int(body["length"])

    assert api.client.put("/v1/budgets/b", json={"scope": "tenant", "period": "day", "limit_usd": 1}).status_code == 201
    first = verified_length()
    assert first >= 1
    wait_for(gauge(stack.url, "agentflow_audit_chain_length", tenant=api.tenant), lambda v: v == first,
             "chain length after one change")  # fmt: skip
    _register(api, _one_step("audited", {"type": "echo"}))
    assert api.wait(api.start("audited", {}))["status"] == "succeeded"
    second = verified_length()
    assert second > first
    wait_for(gauge(stack.url, "agentflow_audit_chain_length", tenant=api.tenant), lambda v: v == second,
             "chain length after a run")  # fmt: skip
    samples = scrape(stack.url)
    assert value(samples, "agentflow_audit_unsealed_entries") is not None
    assert value(samples, "agentflow_audit_unsealed_oldest_age_seconds") is not None


def test_every_source_is_collected_and_none_failed(stack: Stack) -> None:
    samples = scrape(stack.url)
    now = time.time()
    for source in ("queues", "workers", "budgets", "audit"):
        last = value(samples, "agentflow_metrics_collector_last_success_timestamp_seconds", source=source)
        assert last is not None and now - last < 5, (source, last)
        assert not value(samples, "agentflow_metrics_collector_errors_total", source=source), source
    assert value(samples, "agentflow_results_queue_depth") is not None


# --- the Grafana dashboard ----------------------------------------------------------------

#: what Grafana substitutes before a query reaches Prometheus
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects; a syntax or type error raises ValueError."""
    for variable, example in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, example)
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)  # template variables (all inside label matchers)
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


def exposed_series(samples_text: str) -> set[str]:
    """Every series name a scrape can hold, including label sets not observed yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(samples_text):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}  # fmt: skip
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    out: list[str] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(board["panels"]):
        out.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
            out.append(inner.group(1) if inner else text)
    return out


def test_the_name_extractor_finds_what_it_must() -> None:
    assert metric_names('sum by (queue) (rate(agentflow_x_total{queue=~"$queue"}[$__rate_interval]))') == {
        "agentflow_x_total"
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) / on(instance) b") == {
        "a_bucket", "b"
    }  # fmt: skip
    assert metric_names("time() - max(up) or vector(0)") == {"up"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(a_total[5m])")


def test_the_dashboard_reads_only_metrics_the_processes_expose(stack: Stack) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]

    exposed = exposed_series(httpx.get(f"{stack.url}/metrics").text)
    exposed |= exposed_series(httpx.get(f"{stack.default_metrics}/metrics").text)
    queries = dashboard_queries(board)
    assert len(queries) >= 20
    used: set[str] = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        missing = names - exposed
        assert not missing, f"{expr!r} reads {sorted(missing)}, which no process exposes"
        used |= names
    # The metrics this issue adds are all on the dashboard.
    for name in ("agentflow_queue_depth", "agentflow_queue_oldest_pending_age_seconds",
                 "agentflow_worker_heartbeat_inflight_steps", "agentflow_budget_remaining_usd",
                 "agentflow_audit_chain_length", "agentflow_event_stream_connections"):  # fmt: skip
        assert name in used, name


def test_the_documented_metrics_and_alerts_exist(stack: Stack) -> None:
    exposed = exposed_series(httpx.get(f"{stack.url}/metrics").text)
    exposed |= exposed_series(httpx.get(f"{stack.default_metrics}/metrics").text)
    doc = (ROOT / "docs" / "observability.md").read_text()
    metrics_part = doc.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(agentflow_\w+)`", metrics_part))
    histograms = {n for n in documented if f"{n}_bucket" in exposed}
    assert documented - histograms - exposed == set()
    [rules] = re.findall(r"```yaml\n(.*?)```", metrics_part, re.S)
    for rule in yaml.safe_load(rules)["groups"][0]["rules"]:
        assert metric_names(rule["expr"]) <= exposed, rule
    # Every agentflow metric a process exposes is documented.
    families = {n.removesuffix("_total") for n in documented} | histograms
    for name in (n for n in exposed if n.startswith("agentflow_")):
        base = re.sub(r"_(total|created|bucket|sum|count)$", "", name)
        assert base in families or name in documented, f"{name} is not documented in docs/observability.md"


def test_prometheus_and_grafana_provisioning_files_agree() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["agentflow-control-plane"]["static_configs"][0]["targets"] == ["control-plane:8080"]
    assert jobs["agentflow-control-plane"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["agentflow-worker"]["dns_sd_configs"][0]["port"] == 9100

    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    [source] = datasources["datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/agentflow.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    board = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
