"""``agentflow scaffold agent NAME``: a ready-to-install custom agent package.

The skeleton has a typed settings model, the run method, lifecycle hooks, the
``agentflow.agents`` entry point, and a test that passes as generated (``pytest`` in the
new directory), so authors start from green.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[project]
name = "agentflow-{dist}"
version = "0.1.0"
description = "The '{name}' agent for AgentFlow"
requires-python = ">=3.11"
dependencies = ["agentflow"]

# Install this package where the control plane and the workers run: the control plane
# validates the agent's settings, the workers run it.
[project.entry-points."agentflow.agents"]
{name} = "{package}.agent:{cls}"

[tool.hatch.build.targets.wheel]
packages = ["src/{package}"]

[tool.pytest.ini_options]
pythonpath = ["src"]
asyncio_mode = "auto"
"""

_AGENT = '''\
"""The '{name}' agent."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agentflow_worker.agents.base import AgentError, BaseAgent, StepContext


class {cls}(BaseAgent):
    """Say what this agent does: it is shown in graphs, the dashboard and to LLM planners."""

    class Config(BaseModel):
        """The agent's settings in a workflow (``agents.<name>.*``); validated at registration."""

        model_config = ConfigDict(extra="forbid")

        greeting: str = Field("Hello", max_length=200)

    async def setup(self) -> None:
        """Once per worker: open clients, load models."""

    async def close(self) -> None:
        """Once per worker, at shutdown."""

    async def run(self, ctx: StepContext) -> Any:
        config = self.config(ctx)
        data = ctx.input if isinstance(ctx.input, dict) else {{}}
        name = data.get("name")
        if not isinstance(name, str):
            # AgentError fails the step with this message (retried per the agent's retry policy).
            raise AgentError("input.name must be a string")
        return {{"message": f"{{config.greeting}}, {{name}}!"}}
'''

_TEST = '''\
"""Runs the agent the way a worker does, without a worker."""

from __future__ import annotations

import asyncio

import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from {package}.agent import {cls}


def context(config: dict, payload: dict) -> StepContext:
    return StepContext(
        tenant="t", run="r", step="s", seq=1, attempt=1, delivery=1,
        agent_name="{name}", config=config, payload=payload,
    )


def test_greets() -> None:
    out = asyncio.run({cls}().run(context({{"greeting": "Hi"}}, {{"input": {{"name": "Ada"}}}})))
    assert out == {{"message": "Hi, Ada!"}}


def test_bad_input_is_a_clear_failure() -> None:
    with pytest.raises(AgentError, match="input.name"):
        asyncio.run({cls}().run(context({{}}, {{"input": {{}}}})))


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(AgentError, match="greeting"):
        asyncio.run({cls}().run(context({{"greeting": 5}}, {{"input": {{"name": "Ada"}}}})))
'''

_README = """\
# The `{name}` agent

    pip install -e .          # where the control plane and the workers run
    pytest                    # the generated tests pass as they are

Use it in a workflow:

```yaml
agents:
  greet:
    type: {name}
    greeting: Hello
```
"""


def _names(name: str) -> tuple[str, str, str]:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
        raise click.BadParameter("use lower-case letters, digits and _, starting with a letter", param_hint="NAME")
    package = f"{name}_agent"
    cls = "".join(part.capitalize() for part in name.split("_")) + "Agent"
    return package, cls, name.replace("_", "-")


def write_agent_skeleton(name: str, directory: Path) -> list[Path]:
    package, cls, dist = _names(name)
    root = directory / f"agentflow-{dist}"
    if root.exists():
        raise click.ClickException(f"{root} already exists; not overwriting it")
    values = {"name": name, "package": package, "cls": cls, "dist": dist}
    files = {
        root / "pyproject.toml": _PYPROJECT,
        root / "README.md": _README,
        root / "src" / package / "__init__.py": '"""The {name} agent for AgentFlow."""\n',
        root / "src" / package / "agent.py": _AGENT,
        root / "tests" / f"test_{name}_agent.py": _TEST,
    }
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return list(files)


@click.group()
def scaffold() -> None:
    """Generate skeletons (custom agents)."""


@scaffold.command("agent")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where to create the package directory.")  # fmt: skip
def scaffold_agent(name: str, directory: Path) -> None:
    """Write a custom agent package NAME with a passing test."""
    for path in write_agent_skeleton(name, directory):
        click.echo(f"wrote {path}")
    click.echo("next: pip install -e <dir> where the control plane and workers run; then `pytest` in it")
