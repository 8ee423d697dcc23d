"""AgentMap's core agents: default, success, failure, branching."""

from __future__ import annotations

from typing import Any

import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.core import CORE_AGENTS, truthy


def ctx(agent: str, config: dict[str, Any], data: Any = None) -> StepContext:
    return StepContext("t", "r", "s", 1, 1, 1, agent, config, {"input": data, "last": None})


async def run(agent: str, config: dict[str, Any], data: Any = None) -> Any:
    return await CORE_AGENTS[agent].run(ctx(agent, config, data))


def test_exports_exactly_the_core_set() -> None:
    assert set(CORE_AGENTS) == {"default", "success", "failure", "branching"}


async def test_default_returns_output_or_passes_input_through() -> None:
    assert await run("default", {}, {"a": 1}) == {"a": 1}
    assert await run("default", {"output": {"x": [1]}}, {"a": 1}) == {"x": [1]}
    assert await run("default", {"message": "hello"}, "in") == "in"


async def test_success_returns_input() -> None:
    assert await run("success", {}, [1, 2]) == [1, 2]


async def test_failure_fails_with_its_message() -> None:
    with pytest.raises(AgentError, match=r"^failure agent: failing on purpose$"):
        await run("failure", {}, {})
    with pytest.raises(AgentError, match=r"^no stock left$"):
        await run("failure", {"message": "no stock left"}, {})


async def test_bad_settings_name_the_field() -> None:
    with pytest.raises(AgentError, match="agent 'failure' has invalid settings: mesage: Extra inputs"):
        await run("failure", {"mesage": "x"})
    with pytest.raises(AgentError, match="agent 'success' has invalid settings"):
        await run("success", {"output": 1})
    with pytest.raises(AgentError, match="field: String should have at least 1 character"):
        await run("branching", {"field": ""}, {})


async def test_branching_truthy_succeeds_with_the_decision() -> None:
    out = await run("branching", {}, {"success": True, "x": 1})
    assert out == {"branch": "success", "field": "success", "value": True, "input": {"success": True, "x": 1}}
    out = await run("branching", {"field": "approved"}, {"approved": "yes"})
    assert out["value"] == "yes"


async def test_branching_falsy_fails_naming_the_field() -> None:
    with pytest.raises(AgentError, match=r"^branching: 'approved' is false$"):
        await run("branching", {"field": "approved"}, {"approved": False})
    falsies: list[Any] = [0, "", "false", "No", None, [], {}]
    for falsy in falsies:
        with pytest.raises(AgentError, match="is false"):
            await run("branching", {}, {"success": falsy})


async def test_branching_missing_field_uses_default() -> None:
    out = await run("branching", {"field": "ok"}, {"other": 1})
    assert out["branch"] == "success" and out["value"] is None
    with pytest.raises(AgentError, match="'ok' is missing from the input and default is false"):
        await run("branching", {"field": "ok", "default": False}, {"other": 1})
    # no input at all behaves like an empty object
    assert (await run("branching", {}, None))["branch"] == "success"


async def test_branching_dotted_field_and_non_object_input() -> None:
    assert (await run("branching", {"field": "result.ok"}, {"result": {"ok": 1}}))["value"] == 1
    with pytest.raises(AgentError, match=r"'result.ok' is false"):
        await run("branching", {"field": "result.ok"}, {"result": {"ok": 0}})
    with pytest.raises(AgentError, match="the input is a list, not an object with a 'success' field"):
        await run("branching", {}, [True])


def test_truthy_words() -> None:
    assert [truthy(v) for v in ("TRUE", " yes ", "on", "1", "anything", 2, [0])] == [True] * 7
    assert [truthy(v) for v in ("False", "no", "off", "0", "", 0, 0.0, None)] == [False] * 8
