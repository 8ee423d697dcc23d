"""Tool declarations, the tools config file, rate limits (GCRA) and workflow tool references."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agentflow_core.errors import ConfigurationError, ValidationFailed
from agentflow_core.rate_limit import gcra
from agentflow_core.spec import parse_workflow, workflow_tools_of
from agentflow_core.tools import ToolSpec, parse_rate_limit, schema_errors, tool_as_function
from agentflow_core.tools_config import ToolsConfig, load_tools_config


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("100/hour", 100, 3600), ("10/min", 10, 60), ("5/30s", 5, 30), ("1/day", 1, 86400), ("3 / 2h", 3, 7200)],
)
def test_rate_limits_parse(text: str, count: int, period: int) -> None:
    limit = parse_rate_limit(text)
    assert (limit.count, limit.period_s) == (count, period)


@pytest.mark.parametrize("text", ["100", "x/hour", "10/fortnight", "0/hour"])
def test_bad_rate_limits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        parse_rate_limit(text)


def test_gcra_admits_a_burst_then_spaces_calls() -> None:
    limit = parse_rate_limit("4/min")
    tat, allowed = None, []
    for _ in range(6):
        d = gcra(tat, 1000.0, limit)
        allowed.append(d.allowed)
        if d.allowed:
            tat = d.new_tat
        else:
            assert d.retry_after_s == pytest.approx(15.0)
    assert allowed == [True, True, True, True, False, False]
    assert not gcra(tat, 1014.0, limit).allowed
    assert gcra(tat, 1015.0, limit).allowed  # one interval later, one more call


def test_tool_spec_validation_names_the_problem() -> None:
    with pytest.raises(ValidationError, match="not a valid JSON Schema"):
        ToolSpec.model_validate(
            {"id": "t", "handler": {"kind": "command", "argv": ["x"]}, "input_schema": {"type": "nope"}}
        )
    with pytest.raises(ValidationError, match="rate limit"):
        ToolSpec.model_validate({"id": "t", "handler": {"kind": "command", "argv": ["x"]}, "rate_limit": "lots"})
    with pytest.raises(ValidationError, match="not a host name"):
        ToolSpec.model_validate(
            {"id": "t", "handler": {"kind": "command", "argv": ["x"]}, "permissions": {"network": ["http://x/"]}}
        )


def test_schema_errors_list_every_problem_with_its_path() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
        "required": ["n", "s"],
    }
    assert schema_errors(schema, {"n": 1, "s": "x"}) == []
    errors = schema_errors(schema, {"n": "one"})
    assert any(e.startswith("n: ") for e in errors)
    assert any("'s' is a required property" in e for e in errors)


def test_function_declaration_for_models() -> None:
    spec = ToolSpec.model_validate(
        {"id": "files.read", "description": "d", "handler": {"kind": "command", "argv": ["x"]}}
    )
    fn = tool_as_function(spec)
    assert fn["function"]["name"] == "files__read"  # dots are not allowed in OpenAI function names
    assert fn["function"]["parameters"] == {"type": "object"}


def test_tools_config_file(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(
        """
tools:
  - id: weather
    handler: {kind: command, argv: [python3, weather.py]}
    rate_limit: 100/hour
mcp:
  enabled: true
  servers:
    files: {transport: stdio, command: [python3, server.py]}
tenant_policies:
  default: {allowed_tools: [weather]}
  acme: {allowed_hosts: [api.example.com]}
"""
    )
    config = load_tools_config(path)
    assert set(config.declared()) == {"code_executor", "weather"}
    assert config.is_mcp_reference("files.read") and config.is_mcp_reference("files.*")
    assert not config.is_mcp_reference("other.read")
    assert config.policy_for("acme").allowed_hosts == ["api.example.com"]
    assert config.policy_for("someone").allowed_tools == ["weather"]


def test_a_bad_tools_config_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text("tools:\n  - id: code_executor\n    handler: {kind: command, argv: [x]}\n")
    with pytest.raises(ConfigurationError, match="shadows a built-in"):
        load_tools_config(path)
    path.write_text("mcp: {servers: {x: {transport: stdio}}}\n")
    with pytest.raises(ConfigurationError, match="needs 'command'"):
        load_tools_config(path)


WORKFLOW = """
name: tools-demo
tools:
  - id: slugify
    handler: {kind: command, argv: [python3, -c, "print(1)"]}
    input_schema: {type: object, properties: {text: {type: string}}}
agents:
  writer:
    type: llm
    model: {provider: openai, model: gpt-4o-mini}
    prompt: "Write about {topic}"
    tools: [slugify, code_executor]
  plain: {type: echo}
planner:
  type: fsm
  initial_state: writer
  final_states: [done]
  states:
    writer: {agent: writer, on_success: done}
"""


def test_workflow_tools_and_references() -> None:
    spec = parse_workflow(WORKFLOW)
    shipped = workflow_tools_of(spec, "llm", spec.agents["writer"].config)
    assert [t["id"] for t in shipped] == ["slugify"]  # code_executor is built in: not shipped
    assert workflow_tools_of(spec, "echo", {}) == []


def test_unknown_tools_and_settings_are_named() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_workflow(WORKFLOW.replace("[slugify, code_executor]", "[slugify, weather]").replace("prompt:", "promt:"))
    details = {d["loc"]: d["msg"] for d in caught.value.details}
    assert "unknown tool 'weather'" in details["agents.writer.tools.1"]
    assert "Extra inputs" in details["agents.writer.promt"]
    # ...declared in the tools config, it is fine
    config = ToolsConfig.model_validate({"tools": [{"id": "weather", "handler": {"kind": "command", "argv": ["x"]}}]})
    parse_workflow(WORKFLOW.replace("[slugify, code_executor]", "[slugify, weather]"), tools=config)


def test_mcp_references_need_a_configured_server() -> None:
    text = WORKFLOW.replace("[slugify, code_executor]", "[files.read]")
    with pytest.raises(ValidationFailed, match="invalid workflow spec"):
        parse_workflow(text)
    config = ToolsConfig.model_validate(
        {"mcp": {"enabled": True, "servers": {"files": {"transport": "http", "url": "http://127.0.0.1:1/mcp"}}}}
    )
    parse_workflow(text, tools=config)


def test_workflow_tool_may_not_shadow_a_declared_one() -> None:
    text = WORKFLOW.replace("id: slugify", "id: code_executor").replace("[slugify, code_executor]", "[code_executor]")
    with pytest.raises(ValidationFailed) as caught:
        parse_workflow(text)
    assert caught.value.details[0]["loc"] == "tools.0.id"
