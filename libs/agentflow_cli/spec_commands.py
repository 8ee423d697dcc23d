"""Offline spec tooling: ``agentflow validate``, ``agentflow graph``, ``agentflow import agentmap``.

None of these talk to a server: they run the same ``parse_workflow`` the control plane
runs on registration, so a file that validates here registers there (routing functions
are looked up in the local environment's ``agentflow.routing`` entry points).

Exit codes: 0 success, 1 invalid input (a spec that does not validate, a CSV that cannot
be converted), 2 a file that cannot be read. The spec modules are imported inside the
commands so the rest of the CLI starts fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from agentflow_core.errors import ValidationFailed

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def _read(path: Path) -> str | None:
    """The file's text, or None after printing why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        click.echo(f"{path}: cannot read: {reason}", err=True)
        return None


def _problems(exc: ValidationFailed) -> list[str]:
    """``loc: msg`` lines of a ValidationFailed (its message when it has no details)."""
    details: Any = exc.details
    if not isinstance(details, list) or not details:
        return [exc.message]
    lines = []
    for item in details:
        if isinstance(item, dict):
            loc, msg = item.get("loc"), item.get("msg", "")
            lines.append(f"{loc}: {msg}" if loc else str(msg))
        else:
            lines.append(str(item))
    return lines


@click.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate_command(files: tuple[Path, ...]) -> None:
    """Check workflow FILES (YAML/JSON) offline, as the control plane would on registration.

    Prints one 'ok' line per valid file and one line per problem ('FILE: loc: message').
    Exit code 0 when all are valid, 1 when any is invalid, 2 when a file cannot be read.
    """
    from agentflow_core.errors import ValidationFailed
    from agentflow_core.spec import parse_workflow

    code = EXIT_OK
    for path in files:
        text = _read(path)
        if text is None:
            code = max(code, EXIT_UNREADABLE)
            continue
        try:
            spec = parse_workflow(text)
        except ValidationFailed as exc:
            for line in _problems(exc):
                click.echo(f"{path}: {line}")
            code = max(code, EXIT_INVALID)
            continue
        agents = len(spec.agents)
        noun = "agent" if agents == 1 else "agents"
        click.echo(f"{path}: ok ({spec.planner.type}, {agents} {noun}, hash {spec.spec_hash()})")
    sys.exit(code)


@click.command("graph")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
    help="Mermaid flowchart or Graphviz DOT.",
)
def graph_command(file: Path, fmt: str) -> None:
    """Print a diagram of FILE's plan (render DOT with: agentflow graph FILE --format dot | dot -Tsvg)."""
    from agentflow_core.errors import ValidationFailed
    from agentflow_core.graph import FORMATS
    from agentflow_core.spec import parse_workflow

    text = _read(file)
    if text is None:
        sys.exit(EXIT_UNREADABLE)
    try:
        spec = parse_workflow(text)
    except ValidationFailed as exc:
        for line in _problems(exc):
            click.echo(f"{file}: {line}", err=True)
        sys.exit(EXIT_INVALID)
    click.echo(FORMATS[fmt](spec), nl=False)


@click.group("import")
def import_group() -> None:
    """Convert workflows from other tools into AgentFlow specs."""


@import_group.command("agentmap")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--graph", "graph_name", help="The graph to import (required when the CSV holds several).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the YAML spec here (default: stdout).",
)
def import_agentmap_command(file: Path, graph_name: str | None, output: Path | None) -> None:
    """Convert one graph of an AgentMap CSV FILE into a workflow spec (YAML).

    Everything that could not be mapped faithfully is reported on stderr, one line per
    value. Exit code 0 when the spec was produced and validates, 1 when the CSV cannot be
    converted or the produced spec does not validate yet (it is still written, for
    editing; e.g. a routing function that is not registered here), 2 when FILE cannot
    be read.
    """
    import yaml

    from agentflow_core.agentmap import import_agentmap
    from agentflow_core.errors import ValidationFailed
    from agentflow_core.spec import parse_workflow

    text = _read(file)
    if text is None:
        sys.exit(EXIT_UNREADABLE)
    try:
        result = import_agentmap(text, graph_name)
    except ValidationFailed as exc:
        click.echo(f"{file}: cannot import: {exc.message}", err=True)
        for line in _problems(exc):
            click.echo(f"{file}: {line}", err=True)
        sys.exit(EXIT_INVALID)

    # One line each, whatever a header cell holds (the notes are repeated as YAML comments).
    notes = [" ".join(str(issue).split()) for issue in result.report]
    for note in notes:
        click.echo(f"{file}: {note}", err=True)
    graph_name = " ".join(result.graph.split())
    header = [f"# Imported from AgentMap graph '{graph_name}' ({file.name}) by 'agentflow import agentmap'."]
    if notes:
        header.append(f"# {len(notes)} value(s) could not be mapped faithfully:")
        header += [f"#   {note}" for note in notes]
    body = yaml.safe_dump(result.spec, sort_keys=False, allow_unicode=True, width=120)
    document = "\n".join(header) + "\n" + body

    code = EXIT_OK
    try:
        parse_workflow(result.spec)
    except ValidationFailed as exc:
        click.echo(f"{file}: the produced spec does not validate yet:", err=True)
        for line in _problems(exc):
            click.echo(f"{file}: {line}", err=True)
        code = EXIT_INVALID

    if output is None:
        click.echo(document, nl=False)
    else:
        try:
            output.write_text(document, encoding="utf-8")
        except OSError as exc:
            click.echo(f"{output}: cannot write: {exc.strerror or exc}", err=True)
            sys.exit(EXIT_UNREADABLE)
        click.echo(f"{file}: wrote {output} ({result.planner_type}, {len(result.spec['agents'])} agents)", err=True)
    sys.exit(code)


COMMANDS: tuple[click.Command, ...] = (validate_command, graph_command, import_group)

__all__ = ["COMMANDS", "graph_command", "import_agentmap_command", "import_group", "validate_command"]
