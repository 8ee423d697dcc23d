"""``agentflow run``: register a workflow file, start a run, follow it live."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from agentflow_cli.stack import load_stack_state

console = Console(stderr=True)

FINAL = ("succeeded", "failed", "cancelled")
STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


def _table(run: dict[str, Any]) -> Table:
    status = run["status"]
    table = Table(title=f"run {run['id']} · {run['workflow']} v{run['version']} · [{STYLE.get(status, '')}]{status}[/]")
    for column in ("#", "state", "agent", "status", "attempts", "worker", "ms"):
        table.add_column(column)
    for step in run["steps"]:
        ms = step.get("duration_ms")
        table.add_row(
            str(step["seq"]),
            step["state"],
            step["agent"],
            f"[{STYLE.get(step['status'], '')}]{step['status']}[/]",
            str(step["attempts"]),
            step.get("worker") or "",
            f"{ms:.1f}" if ms is not None else "",
        )
    return table


def _error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    lines = [f"HTTP {response.status_code}: {body.get('detail', body)}"]
    for err in body.get("errors") or []:
        lines.append(f"  {err.get('loc')}: {err.get('msg')}")
    return "\n".join(lines)


def resolve_api(api_url: str | None, token: str | None) -> tuple[str, str] | None:
    """The API URL and token to use: given ones, else the local stack's (``agentflow up``).
    Prints why and returns None when there are none."""
    if api_url and token:
        return api_url, token
    state = load_stack_state()
    if state is None:
        console.print("[red]no API URL/token: set AGENTFLOW_API_URL and AGENTFLOW_TOKEN, or start `agentflow up`[/]")
        return None
    return api_url or str(state["api_url"]), token or str(state["token"])


def run_workflow(
    file: Path,
    run_input: Any,
    *,
    wait: bool,
    api_url: str | None,
    token: str | None,
    timeout: float,
) -> int:
    found = resolve_api(api_url, token)
    if found is None:
        return 2
    api_url, token = found
    source = file.read_bytes()
    content_type = "application/json" if file.suffix == ".json" else "application/yaml"
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        import yaml

        try:
            name = (yaml.safe_load(source) or {}).get("name")
        except (yaml.YAMLError, AttributeError):
            name = None
        if not isinstance(name, str):
            console.print(f"[red]{file}: the workflow needs a top-level 'name'[/]")
            return 2
        put = client.put(f"/v1/workflows/{name}", content=source, headers={"Content-Type": content_type})
        if put.status_code != 200:
            console.print(f"[red]registering {file} failed[/]\n{_error(put)}")
            return 2
        version = put.json()["version"]
        created = client.post("/v1/runs", json={"workflow": name, "version": version, "input": run_input})
        if created.status_code not in (200, 201):
            console.print(f"[red]starting the run failed[/]\n{_error(created)}")
            return 2
        run_id = created.json()["id"]
        print(run_id, flush=True)
        if not wait:
            return 0
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        with Live(console=console, refresh_per_second=10) as live:
            while time.monotonic() < deadline:
                response = client.get(f"/v1/runs/{run_id}")
                if response.status_code != 200:
                    console.print(f"[red]{_error(response)}[/]")
                    return 2
                run = response.json()
                live.update(_table(run))
                if run["status"] in FINAL:
                    break
                time.sleep(0.2)
        if run.get("status") not in FINAL:
            console.print(f"[yellow]run {run_id} still {run.get('status')} after {timeout}s[/]")
            return 3
        if run["status"] == "succeeded":
            import json

            console.print("\noutput:", json.dumps(run["output"]))
            return 0
        console.print(f"[red]run {run['status']}: {run.get('error')}[/]")
        return 1
