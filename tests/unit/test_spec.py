from __future__ import annotations

import copy
from typing import Any

import pytest

from agentflow_cli.demo import HELLO_WORKFLOW
from agentflow_core.errors import ValidationFailed
from agentflow_core.spec import parse_workflow

HELLO = HELLO_WORKFLOW


def _base() -> dict[str, Any]:
    return {
        "name": "wf",
        "agents": {"a": {"type": "echo"}},
        "planner": {
            "type": "fsm",
            "initial_state": "s1",
            "states": {"s1": {"agent": "a", "on_success": "done"}},
            "final_states": ["done"],
        },
    }


def _errors(data: Any, **kwargs: Any) -> list[dict[str, str]]:
    with pytest.raises(ValidationFailed) as info:
        parse_workflow(data, **kwargs)
    details = info.value.details
    assert isinstance(details, list) and details
    return details


def test_hello_parses_with_agent_settings() -> None:
    spec = parse_workflow(HELLO)
    nap = spec.agents["nap"]
    assert nap.config == {"ms": 50}
    assert nap.retry.max_attempts == 3 and nap.retry.backoff_ms == 100
    assert nap.timeout_s == 5
    assert spec.planner.final_states == ["done", "failed"]


def test_spec_hash_ignores_formatting_and_defaults() -> None:
    as_json = parse_workflow(_base())
    explicit = _base()
    explicit["agents"]["a"]["queue"] = "default"
    explicit["agents"]["a"]["retry"] = {"max_attempts": 1}
    assert parse_workflow(explicit).spec_hash() == as_json.spec_hash()
    changed = _base()
    changed["agents"]["a"]["timeout_s"] = 3
    assert parse_workflow(changed).spec_hash() != as_json.spec_hash()


def test_retry_backoff_grows_and_is_capped() -> None:
    spec = parse_workflow(HELLO)
    policy = spec.agents["nap"].retry
    assert [policy.delay_ms(n) for n in (1, 2, 3)] == [100, 200, 400]
    policy = policy.model_copy(update={"max_backoff_ms": 150})
    assert policy.delay_ms(3) == 150


@pytest.mark.parametrize(
    ("mutate", "loc", "fragment"),
    [
        (lambda d: d["planner"]["states"]["s1"].update(on_success="nowhere"), "planner.states.s1.on_success",
         "unknown state 'nowhere'"),
        (lambda d: d["planner"]["states"]["s1"].update(agent="ghost"), "planner.states.s1.agent", "unknown agent"),
        (lambda d: d["planner"].update(initial_state="zzz"), "planner.initial_state", "unknown state"),
        (lambda d: d["planner"].update(final_states=[]), "planner.final_states", "at least 1"),
        (lambda d: d["agents"]["a"].update(type="teleport"), "agents.a.type", "unknown agent type"),
        (lambda d: d["agents"]["a"].update(timeout_s=-1), "agents.a.timeout_s", "greater than 0"),
        (lambda d: d["planner"]["states"]["s1"].update(on_sucess="done"), "planner.states.s1.on_sucess",
         "Extra inputs"),
        (lambda d: d["planner"]["states"].update(orphan={"agent": "a", "on_success": "done"}),
         "planner.states.orphan", "unreachable"),
        (lambda d: d["planner"].update(final_states=["done", "never"]), "planner.final_states",
         "'never' is unreachable"),
        (lambda d: d.update(name="bad name!"), "name", "pattern"),
        (lambda d: d["planner"].update(type="telepathy"), "planner", "tag"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_field(mutate: Any, loc: str, fragment: str) -> None:
    data = copy.deepcopy(_base())
    mutate(data)
    errors = _errors(data)
    assert any(e["loc"].startswith(loc) and fragment in e["msg"] for e in errors), errors


def test_invalid_yaml_and_non_mapping() -> None:
    assert _errors("name: [unclosed")[0]["loc"] == "body"
    assert "mapping" in _errors("- just\n- a list")[0]["msg"]


def test_url_name_must_match_body() -> None:
    assert _errors(_base(), name="other")[0]["loc"] == "name"
    assert parse_workflow({k: v for k, v in _base().items() if k != "name"}, name="filled").name == "filled"


def test_sleep_settings_are_checked() -> None:
    data = _base()
    data["agents"]["a"] = {"type": "sleep", "ms": "soon"}
    assert any(e["loc"] == "agents.a.ms" for e in _errors(data))
    data["agents"]["a"] = {"type": "echo", "colour": "blue"}
    assert any(e["loc"] == "agents.a.colour" for e in _errors(data))
