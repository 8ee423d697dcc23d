"""Prompt references (prompt:, file:, yaml:#key) and their filling from the step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.llm_prompts import PromptError, render_setting, resolve_reference


def _ctx(input: object = None, last: object = None) -> StepContext:
    return StepContext("acme", "run-1", "s1", 1, 1, 1, "writer", {}, {"input": input, "last": last})


@pytest.fixture
def prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "prompts"
    (root / "nested").mkdir(parents=True)
    (root / "registry.yaml").write_text("summarise: 'Summarise {input.text} for {audience}.'\nnumber: 3\n")
    (root / "nested" / "system.txt").write_text("You are terse. Previous: {last.summary}")
    (root / "library.yaml").write_text(
        "writer:\n  tone:\n    formal: 'Write formally about {topic}.'\n  list: [a, b]\n"
    )
    monkeypatch.setenv("AGENTFLOW_PROMPTS_DIR", str(root))
    monkeypatch.setenv("AGENTFLOW_PROMPTS_FILE", str(root / "registry.yaml"))
    return root


def test_plain_template_is_filled_from_input_last_and_top_level_keys() -> None:
    ctx = _ctx({"name": "Ada", "n": 2}, {"done": True})
    text = render_setting("Hi {input.name} ({name}), n={n}, last={last}", ctx, "prompt")
    assert text == 'Hi Ada (Ada), n=2, last={"done":true}'


def test_text_that_merely_starts_like_a_reference_is_a_template() -> None:
    assert resolve_reference("prompt: summarise the text below") == "prompt: summarise the text below"


def test_registry_prompt(prompts: Path) -> None:
    text = render_setting("prompt:summarise", _ctx({"text": "the report", "audience": "execs"}), "prompt")
    assert text == "Summarise the report for execs."


def test_registry_is_reread_when_it_changes(prompts: Path) -> None:
    registry = prompts / "registry.yaml"
    assert resolve_reference("prompt:summarise").startswith("Summarise")
    registry.write_text("summarise: 'Condense it.'\n")
    stat = registry.stat()
    # Make sure the modification time moves even on coarse-grained filesystems.
    os.utime(registry, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert resolve_reference("prompt:summarise") == "Condense it."


def test_file_and_yaml_references(prompts: Path) -> None:
    ctx = _ctx({"topic": "tides"}, {"summary": "earlier"})
    assert render_setting("file:nested/system.txt", ctx, "system") == "You are terse. Previous: earlier"
    assert render_setting("yaml:library.yaml#writer.tone.formal", ctx, "prompt") == "Write formally about tides."
    absolute = prompts / "nested" / "system.txt"
    assert resolve_reference(f"file:{absolute}").startswith("You are terse")


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("prompt:nope", "unknown prompt 'nope'"),
        ("prompt:number", "prompt 'number' in the registry"),
        ("file:missing.txt", "does not exist"),
        (
            "yaml:library.yaml#writer.tone.casual",
            "has no key 'writer.tone.casual' ('casual' is missing under writer.tone)",
        ),
        ("yaml:library.yaml#writer.list", "is not text"),
        ("file:../secrets.txt", "may not contain '..'"),
        ("file:/etc/passwd", "outside the prompts directory"),
    ],
)
def test_bad_references_name_the_problem(prompts: Path, setting: str, expected: str) -> None:
    with pytest.raises(PromptError) as info:
        render_setting(setting, _ctx({}), "agent 'writer' prompt")
    assert expected in str(info.value)
    assert str(info.value).startswith("agent 'writer' prompt")


def test_symlink_out_of_the_directory_is_refused(prompts: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    (prompts / "link.txt").symlink_to(outside)
    with pytest.raises(PromptError, match="outside the prompts directory"):
        resolve_reference("file:link.txt")


def test_registry_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTFLOW_PROMPTS_FILE", raising=False)
    with pytest.raises(PromptError, match="AGENTFLOW_PROMPTS_FILE is not set"):
        resolve_reference("prompt:anything")


def test_missing_field_names_it() -> None:
    with pytest.raises(AgentError) as info:
        render_setting("Summarise {input.text}", _ctx({"title": "x"}), "agent 'writer' prompt")
    message = str(info.value)
    assert message.startswith("agent 'writer' prompt: ")
    assert "{input.text}" in message and "'text'" in message


def test_an_unchanged_file_is_served_from_the_cache(prompts: Path) -> None:
    path = prompts / "nested" / "system.txt"
    first = resolve_reference("file:nested/system.txt")
    before = path.stat()
    # Same size, same modification time: the cache cannot tell, so it must not re-read.
    path.write_text(first.upper())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert resolve_reference("file:nested/system.txt") == first
