"""``agentflow audit verify`` and ``agentflow costs``.

Both ask the control plane's API by default (the token decides the tenant). ``audit verify``
can also read Postgres directly (``--database-url``): the operator's check, independent of
any running control plane, over one tenant (``--tenant``) or all of them.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from agentflow_cli.run_command import _error, resolve_api

out = Console()
err = Console(stderr=True)

_api_url = click.option("--api-url", envvar="AGENTFLOW_API_URL", help="Control plane URL (default: the local stack).")
_token = click.option(
    "--token", "api_token", envvar="AGENTFLOW_TOKEN", help="Bearer token (default: the local stack's)."
)


def _get(api_url: str | None, token: str | None, path: str, params: dict[str, Any] | None = None) -> Any:
    found = resolve_api(api_url, token)
    if found is None:
        sys.exit(2)
    url, bearer = found
    try:
        response = httpx.get(f"{url}{path}", params=params, headers={"Authorization": f"Bearer {bearer}"}, timeout=600)
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach {url}: {exc}[/]")
        sys.exit(2)
    if response.status_code != 200:
        err.print(f"[red]{_error(response)}[/]")
        sys.exit(2)
    return response.json()


@click.group()
def audit() -> None:
    """The tenant's tamper-evident audit chain."""


def _verdict_table(rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title="audit chain verification")
    for column in ("tenant", "ok", "entries", "head hash", "first bad seq", "anchor", "problem", "entries/s"):
        table.add_column(column)
    for tenant, v in rows:
        anchor = v.get("anchor")
        anchor_text = (
            ""
            if not anchor
            else f"seq {anchor['seq']}: " + {True: "matches", False: "MISMATCH"}.get(anchor["matches"], "not reached")
        )
        rate = v["length"] / v["elapsed_s"] if v.get("elapsed_s") else 0
        table.add_row(
            tenant,
            "[green]yes[/]" if v["ok"] else "[red]NO[/]",
            str(v["length"]),
            v["head_hash"][:23] + "…",
            "" if v.get("first_bad_seq") is None else str(v["first_bad_seq"]),
            anchor_text,
            v.get("problem") or "",
            f"{rate:,.0f}",
        )
    return table


@audit.command("verify")
@click.option("--tenant", help="With --database-url: only this tenant (default: every tenant).")
@click.option(
    "--database-url",
    help="Verify straight from Postgres instead of through the API (an operator's independent check).",
)
@_api_url
@_token
def verify(tenant: str | None, database_url: str | None, api_url: str | None, api_token: str | None) -> None:
    """Recompute every hash of the chain; exit 1 when it was tampered with."""
    if database_url is None:
        if tenant is not None:
            raise click.UsageError("--tenant needs --database-url (through the API, the token decides the tenant)")
        verdict = _get(api_url, api_token, "/v1/audit/verify")
        out.print(_verdict_table([("(token's tenant)", verdict)]))
        sys.exit(0 if verdict["ok"] and (verdict.get("anchor") or {}).get("matches") is not False else 1)
    results = asyncio.run(_verify_in_database(database_url, tenant))
    if not results:
        err.print("no audit chain found" + (f" for tenant '{tenant}'" if tenant else ""))
        sys.exit(1 if tenant else 0)
    out.print(_verdict_table(results))
    sys.exit(0 if all(v["ok"] for _, v in results) else 1)


async def _verify_in_database(database_url: str, tenant: str | None) -> list[tuple[str, dict[str, Any]]]:
    import asyncpg

    from agentflow_control_plane.governance.audit_store import verify as verify_chain

    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        if tenant:
            tenants = [tenant] if await conn.fetchval("SELECT 1 FROM audit_heads WHERE tenant_id = $1", tenant) else []
        else:
            tenants = [r[0] for r in await conn.fetch("SELECT tenant_id FROM audit_heads ORDER BY tenant_id")]
        return [(t, (await verify_chain(conn, t)).as_dict()) for t in tenants]
    finally:
        await conn.close()


@click.command()
@click.option("--period", type=click.Choice(["today", "7d", "month"]), default="today", show_default=True)
@click.option(
    "--by", "group_by", type=click.Choice(["workflow", "agent", "model", "day", "run"]), default="workflow",
    show_default=True, help="How to group the rows.",
)  # fmt: skip
@click.option("--workflow", help="Only this workflow.")
@_api_url
@_token
def costs(period: str, group_by: str, workflow: str | None, api_url: str | None, api_token: str | None) -> None:
    """What LLM and tool calls cost in a period, from the cost ledger."""
    params = {"period": period, "group_by": group_by}
    if workflow:
        params["workflow"] = workflow
    body = _get(api_url, api_token, "/v1/costs", params)
    table = Table(title=f"costs · {period} · by {group_by}")
    for column in (group_by, "cost (USD)", "prompt tokens", "completion tokens", "LLM calls", "tool calls"):
        table.add_column(column, justify="left" if column == group_by else "right")
    for g in body["groups"]:
        table.add_row(g["key"], g["cost_usd"], f"{g['prompt_tokens']:,}", f"{g['completion_tokens']:,}",
                      str(g["llm_calls"]), str(g["tool_calls"]))  # fmt: skip
    t = body["total"]
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{t['cost_usd']}[/]", f"{t['prompt_tokens']:,}",
                  f"{t['completion_tokens']:,}", str(t["llm_calls"]), str(t["tool_calls"]))  # fmt: skip
    out.print(table)


COMMANDS = (audit, costs)
