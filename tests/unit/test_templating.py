"""Step templates: placeholders, escapes, typed single placeholders, URL quoting, errors."""

from __future__ import annotations

from typing import Any

import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.templating import placeholders, render, render_value, step_scope

SCOPE: dict[str, Any] = {
    "input": {"name": "Ada", "n": 3, "items": ["a", {"deep": True}], "obj": {"k": None}, "path": "x/../y?z=1"},
    "last": {"score": 0.5},
    "name": "Ada",
    "n": 3,
}


def ctx(payload: dict[str, Any]) -> StepContext:
    return StepContext("t", "r", "s", 1, 1, 1, "agent", {}, payload)


def test_dotted_paths_indices_and_top_level_fields() -> None:
    assert render("Hi {input.name}, {name}!", SCOPE) == "Hi Ada, Ada!"
    assert render("{input.items.0}/{input.items.1.deep}", SCOPE) == "a/true"
    assert render("{last.score}", SCOPE) == "0.5"


def test_non_strings_render_as_json() -> None:
    assert render("{input.obj}|{input.obj.k}|{n}", SCOPE) == '{"k":null}|null|3'
    assert render("{input.items}", SCOPE) == '["a",{"deep":true}]'


def test_double_braces_are_literal() -> None:
    assert render('{{"a": {n}}}', SCOPE) == '{"a": 3}'
    assert render("{{input.name}}", SCOPE) == "{input.name}"
    assert render("no placeholders", SCOPE) == "no placeholders"
    assert render("", SCOPE) == ""


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ('{"a": 1}', "position 0 does not start a placeholder"),
        ("x } y", "unmatched '}' at position 2"),
        ("{input.name", "position 0 does not start a placeholder"),
        ("{ input.name }", "position 0"),
    ],
)
def test_stray_braces_are_errors_with_a_position(template: str, fragment: str) -> None:
    with pytest.raises(AgentError, match="template") as info:
        render(template, SCOPE)
    assert fragment in str(info.value)


def test_missing_top_level_field_names_placeholder_and_available_keys() -> None:
    with pytest.raises(AgentError) as info:
        render("Hello {nmae}", SCOPE)
    message = str(info.value)
    assert "{nmae}" in message
    assert "available top-level keys: input, last, n, name" in message


def test_missing_nested_field_index_and_scalar_walk() -> None:
    with pytest.raises(AgentError, match=r"\{input\.nope\}: 'input' has no field 'nope'; its keys: .*name"):
        render("{input.nope}", SCOPE)
    with pytest.raises(AgentError, match=r"index 5 is out of range \('input.items' has 2 items\)"):
        render("{input.items.5}", SCOPE)
    with pytest.raises(AgentError, match=r"'input.items' is a list; 'first' is not an index"):
        render("{input.items.first}", SCOPE)
    with pytest.raises(AgentError, match=r"'input.name' is a str, which has no field 'x'"):
        render("{input.name.x}", SCOPE)


def test_url_quote_encodes_values_but_not_the_template() -> None:
    url = render("https://api.example.com/users/{input.path}?q={name}", SCOPE, url_quote=True)
    assert url == "https://api.example.com/users/x%2F..%2Fy%3Fz%3D1?q=Ada"
    hostile = {"input": {"h": "evil.com/@x"}}
    assert render("https://ok.com/{input.h}", hostile, url_quote=True) == "https://ok.com/evil.com%2F%40x"


def test_render_value_keeps_type_of_a_lone_placeholder_and_recurses() -> None:
    value = render_value(
        {"count": "{input.n}", "list": ["{input.items}", "n={n}", 7, None], "flag": "{input.items.1.deep}"},
        SCOPE,
    )
    assert value == {"count": 3, "list": [["a", {"deep": True}], "n=3", 7, None], "flag": True}
    # an escaped brace pair is not a placeholder, so it stays a string
    assert render_value("{{n}}", SCOPE) == "{n}"
    # keys are left alone
    assert render_value({"{n}": "x"}, SCOPE) == {"{n}": "x"}


def test_placeholders_lists_what_a_template_uses() -> None:
    assert placeholders("a {input.x} {{b}} {last.y.0}") == ["{input.x}", "{last.y.0}"]


def test_step_scope_input_and_last_win_over_input_keys() -> None:
    scope = step_scope(ctx({"input": {"input": "shadow", "last": "shadow", "city": "Oslo"}, "last": [1]}))
    assert scope["city"] == "Oslo"
    assert scope["input"] == {"input": "shadow", "last": "shadow", "city": "Oslo"}
    assert scope["last"] == [1]
    assert render("{input.input}", scope) == "shadow"


def test_step_scope_with_non_object_input() -> None:
    scope = step_scope(ctx({"input": ["x", "y"]}))
    assert set(scope) == {"input", "last"}
    assert render("{input.1}", scope) == "y"
    assert scope["last"] is None
