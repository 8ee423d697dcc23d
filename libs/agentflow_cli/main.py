"""``agentflow``: start the embedded stack, run the server processes, start runs.

Server imports are done inside the commands so ``agentflow token`` or ``agentflow run``
start fast and work without the server's heavy modules loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from agentflow_cli.governance_commands import COMMANDS as GOVERNANCE_COMMANDS
from agentflow_cli.scaffold import scaffold
from agentflow_cli.spec_commands import COMMANDS as SPEC_COMMANDS


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _tune_gc() -> None:
    """Fewer, cheaper garbage-collector pauses for the long-running servers.

    Objects alive after start-up (modules, app, settings) are frozen out of collection,
    and the young generation is collected less often: each full pass over a big heap
    stalls every request in flight, which showed as the API's latency tail.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _settings_or_exit(factory: Any) -> Any:
    from pydantic import ValidationError

    from agentflow_core.errors import ConfigurationError

    try:
        return factory()
    except ConfigurationError as exc:
        raise click.ClickException(exc.message) from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"AGENTFLOW_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise click.ClickException(f"invalid settings: {problems}") from exc


@click.group()
@click.version_option(package_name="agentflow")
def cli() -> None:
    """AgentFlow: durable, deterministic multi-agent orchestration."""


@cli.command("control-plane")
def control_plane() -> None:
    """Run the control plane (REST API and engine), configured by AGENTFLOW_* variables."""
    import uvicorn

    from agentflow_control_plane.app import create_app
    from agentflow_control_plane.settings import ControlPlaneSettings

    settings = _settings_or_exit(ControlPlaneSettings)
    _setup_logging(settings.log_level)
    _tune_gc()
    app = _settings_or_exit(lambda: create_app(settings))  # OTEL_* it cannot honor: a plain error
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        # Behind a proxy, set FORWARDED_ALLOW_IPS and run uvicorn yourself; parsing
        # forwarded headers on every request costs throughput for nothing otherwise.
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )


@cli.command()
@click.option("--queue", help="Queue to consume (default: AGENTFLOW_WORKER_QUEUE or 'default').")
@click.option(
    "--concurrency",
    type=int,
    help="Steps run at once (default: AGENTFLOW_WORKER_CONCURRENCY or 64).",
)
def worker(queue: str | None, concurrency: int | None) -> None:
    """Run a worker that executes steps from one queue."""
    from agentflow_worker.settings import WorkerSettings
    from agentflow_worker.tracing import setup as setup_tracing
    from agentflow_worker.worker import run_worker

    overrides: dict[str, Any] = {}
    if queue:
        overrides["worker_queue"] = queue
    if concurrency:
        overrides["worker_concurrency"] = concurrency
    settings = _settings_or_exit(lambda: WorkerSettings(**overrides))
    _setup_logging(settings.log_level)
    _install_uvloop()
    _tune_gc()
    _settings_or_exit(setup_tracing)  # OTEL_* it cannot honor: a plain error

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    asyncio.run(main())


@cli.command()
def migrate() -> None:
    """Apply database migrations (AGENTFLOW_DATABASE_URL) and exit."""
    from agentflow_control_plane.db.migrate import upgrade
    from agentflow_control_plane.settings import DatabaseSettings

    settings = _settings_or_exit(DatabaseSettings)
    _setup_logging("info")
    upgrade(settings.database_url)
    click.echo("migrations applied")


@cli.command()
@click.option("--tenant", required=True, help="Tenant the token acts for.")
@click.option("--role", "roles", multiple=True, default=["admin"], show_default=True,
              type=click.Choice(["admin", "operator", "viewer"]), help="Role (repeatable).")  # fmt: skip
@click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1), help="Lifetime in seconds.")
@click.option("--subject", default="cli", show_default=True, help="The token's 'sub' claim.")
def token(tenant: str, roles: tuple[str, ...], ttl: int, subject: str) -> None:
    """Print an HS256 token signed with AGENTFLOW_JWT_SECRET."""
    from agentflow_control_plane.auth import issue_token
    from agentflow_control_plane.settings import ControlPlaneSettings

    settings = _settings_or_exit(ControlPlaneSettings)
    if not settings.jwt_secret:
        raise click.ClickException("AGENTFLOW_JWT_SECRET is not set (RS256 tokens are signed by your issuer)")
    try:
        click.echo(issue_token(settings.jwt_secret, tenant=tenant, roles=list(roles), subject=subject, ttl_s=ttl))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0, 64))
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--home", type=click.Path(path_type=Path), help="State directory (default: /var/lib/agentflow "
              "as root, ~/.agentflow otherwise).")  # fmt: skip
@click.option("--demo/--no-demo", default=False, help="Register and run the 'hello' workflow once ready.")
def up(workers: int, port: int, home: Path | None, demo: bool) -> None:
    """Start Postgres, NATS, migrations, a control plane and N workers; Ctrl-C stops all."""
    from agentflow_cli.stack import Stack

    _setup_logging("warning")
    stack = Stack(home=home, port=port, workers=workers)
    sys.exit(stack.run(demo=demo))


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "input_json", default="null", help="Run input as JSON.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the run until it ends.")
@click.option("--api-url", envvar="AGENTFLOW_API_URL", help="Control plane URL (default: the local stack).")
@click.option(
    "--token",
    "api_token",
    envvar="AGENTFLOW_TOKEN",
    help="Bearer token (default: the local stack's).",
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the run.")
def run(
    file: Path,
    input_json: str,
    wait: bool,
    api_url: str | None,
    api_token: str | None,
    timeout: float,
) -> None:
    """Register FILE (YAML/JSON workflow), start a run and show its progress."""
    from agentflow_cli.run_command import run_workflow

    try:
        run_input = json.loads(input_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--input") from exc
    sys.exit(run_workflow(file, run_input, wait=wait, api_url=api_url, token=api_token, timeout=timeout))


for _command in SPEC_COMMANDS:  # validate, graph, import (offline spec tooling)
    cli.add_command(_command)
cli.add_command(scaffold)
for _command in GOVERNANCE_COMMANDS:  # audit verify, costs
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="agentflow", auto_envvar_prefix=None)


if __name__ == "__main__":
    main()
