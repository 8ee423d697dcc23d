"""The ``llm`` agent, in process, through real litellm against a real local HTTP server.

The model side is the fake OpenAI-compatible server (tests/support/fake_llm.py): real
HTTP, scripted answers. The tool side is the real ToolRuntime (permissions, schemas,
records) with an in-test handler for ``command`` tools, so these tests do not depend on
the sandbox.
"""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentflow_core.exec_profile import ExecProfile
from agentflow_core.tools import ToolSpec
from agentflow_core.tools_config import ToolsConfig
from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.llm import LLM_AGENTS, LlmAgent, backoff_s, retry_after_s, strip_fences
from agentflow_worker.agents.llm_pricing import litellm_module
from agentflow_worker.secrets import SecretStore
from agentflow_worker.services import WorkerServices
from agentflow_worker.tools.runtime import ToolRuntime
from tests.support.fake_llm import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]
PRICES = {"my-llama": {"input_per_million": 2.0, "output_per_million": 8.0}}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


class ListSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int, str, dict[str, Any]]] = []

    async def emit(self, tenant: str, run: str, step: str, attempt: int, kind: str, data: dict[str, Any]) -> None:
        self.events.append((tenant, run, step, attempt, kind, data))


class RecordingGate:
    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple[str, str, str, float, int]] = []
        self.refuse = refuse

    async def before_llm_call(
        self, tenant: str, run: str, step: str, estimate_usd: float, estimate_tokens: int
    ) -> None:
        self.calls.append((tenant, run, step, estimate_usd, estimate_tokens))
        if self.refuse:
            raise AgentError(f"tenant {tenant} budget exhausted (this call: up to {estimate_tokens} tokens)")


class ArithmeticHandler:
    """Stands in for the sandboxed ``command`` handler: computes from its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def invoke(self, spec: ToolSpec, profile: ExecProfile, arguments: dict[str, Any], env: dict[str, str]) -> Any:
        self.calls.append((spec.id, arguments))
        if spec.id == "math.add":
            return {"result": arguments["a"] + arguments["b"]}
        if spec.id == "math.mul":
            return {"result": arguments["a"] * arguments["b"]}
        return {"secret": "should never be reached"}


NUMBERS = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


def _tool(tool_id: str, description: str) -> ToolSpec:
    return ToolSpec.model_validate(
        {
            "id": tool_id,
            "description": description,
            "input_schema": NUMBERS,
            "handler": {"kind": "command", "argv": ["/bin/false"]},
        }
    )


def services(
    *,
    handler: ArithmeticHandler | None = None,
    progress: ListSink | None = None,
    budget: RecordingGate | None = None,
    prices: dict[str, dict[str, float]] | None = None,
) -> WorkerServices:
    svc = WorkerServices(
        secrets=SecretStore(environ={"AGENTFLOW_SECRET_LLM_KEY": "sk-test-123"}),
        llm_prices=PRICES if prices is None else prices,
        budget=budget,
    )
    if progress is not None:
        svc.progress = progress
    if handler is not None:
        config = ToolsConfig(
            tools=[
                _tool("math.add", "Add two numbers"),
                _tool("math.mul", "Multiply two numbers"),
                _tool("vault", "Reads secrets"),
            ]
        )
        svc.tools = ToolRuntime(config, {"command": handler}, secrets=svc.secrets)
    return svc


def model(fake: FakeOpenAI, name: str = "my-llama", **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": name, "api_base": fake.api_base, "api_key_secret": "LLM_KEY", **extra}


def context(config: dict[str, Any], svc: WorkerServices, input: Any = None, last: Any = None) -> StepContext:
    return StepContext(
        "acme", "run-1", "step-1", 1, 2, 1, "writer", config, {"input": input, "last": last}, services=svc
    )


async def run(
    config: dict[str, Any], svc: WorkerServices, input: Any = None, last: Any = None
) -> tuple[Any, StepContext]:
    ctx = context(config, svc, input, last)
    return await LlmAgent().run(ctx), ctx


# --- plain calls, usage, cost ------------------------------------------------------------


async def test_plain_answer_with_usage_and_cost_from_the_price_table(fake: FakeOpenAI) -> None:
    fake.script({"content": "Hello, Ada.", "usage": {"prompt_tokens": 1000, "completion_tokens": 250}})
    config = {
        "model": model(fake, temperature=0.3, max_tokens=200, timeout_s=30),
        "system": "You greet people.",
        "prompt": "Greet {input.name}.",
    }
    output, ctx = await run(config, services(), {"name": "Ada"})
    assert output == {
        "content": "Hello, Ada.",
        "model": "openai/my-llama",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 250, "cost_usd": pytest.approx(0.004)},
        "tool_calls": 0,
    }
    summary = ctx.meter.summary()
    assert summary is not None
    assert summary["llm_calls"] == [
        {
            "model": "openai/my-llama",
            "prompt_tokens": 1000,
            "completion_tokens": 250,
            "cost_usd": pytest.approx(0.004),
            "price_source": "config",
        }
    ]
    [request] = fake.requests
    body = request["body"]
    assert body["model"] == "my-llama"
    assert body["messages"] == [
        {"role": "system", "content": "You greet people."},
        {"role": "user", "content": "Greet Ada."},
    ]
    assert (body["temperature"], body["max_tokens"]) == (0.3, 200)
    assert request["headers"]["authorization"] == "Bearer sk-test-123"
    assert "response_format" not in body and "tools" not in body


async def test_counted_usage_when_not_scripted_and_price_keyed_by_route(fake: FakeOpenAI) -> None:
    fake.script({"content": "A fairly short answer of a few words."})
    prices = {"openai/my-llama": {"input_per_million": 1_000_000.0, "output_per_million": 0.0}}
    output, ctx = await run({"model": model(fake), "prompt": "Say something."}, services(prices=prices))
    usage = output["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    # $1 per input token: the cost is exactly the prompt token count.
    assert usage["cost_usd"] == pytest.approx(usage["prompt_tokens"])
    assert ctx.meter.llm_calls[0].price_source == "config"


async def test_known_model_behind_api_base_is_priced_by_litellm(fake: FakeOpenAI) -> None:
    fake.script({"content": "ok", "usage": {"prompt_tokens": 2000, "completion_tokens": 1000}})
    output, ctx = await run({"model": model(fake, "gpt-4o-mini"), "prompt": "Hi"}, services(prices={}))
    entry = litellm_module().model_cost["gpt-4o-mini"]
    expected = 2000 * entry["input_cost_per_token"] + 1000 * entry["output_cost_per_token"]
    assert expected > 0
    [call] = ctx.meter.llm_calls
    assert (call.model, call.price_source) == ("openai/gpt-4o-mini", "litellm")
    assert call.cost_usd == pytest.approx(expected)
    assert output["usage"]["cost_usd"] == pytest.approx(expected)


async def test_unknown_model_costs_zero_with_unknown_source(fake: FakeOpenAI) -> None:
    fake.script({"content": "ok"})
    _, ctx = await run({"model": model(fake, "homegrown-13b"), "prompt": "Hi"}, services(prices={}))
    [call] = ctx.meter.llm_calls
    assert (call.cost_usd, call.price_source) == (0.0, "unknown")
    assert call.prompt_tokens > 0


async def test_agent_is_exported_under_its_type_name() -> None:
    assert isinstance(LLM_AGENTS["llm"], LlmAgent)


async def test_invalid_settings_name_the_field() -> None:
    with pytest.raises(AgentError, match=r"agent 'writer' has invalid settings: .*model\.temperature"):
        await run({"model": {"provider": "openai", "model": "m", "temperature": 9}, "prompt": "x"}, services())


async def test_unknown_provider_is_refused_before_any_call(fake: FakeOpenAI) -> None:
    config = {"model": {"provider": "nosuchcloud", "model": "m", "api_base": fake.api_base}, "prompt": "x"}
    with pytest.raises(AgentError, match="provider 'nosuchcloud' is not one litellm knows"):
        await run(config, services())
    assert fake.requests == []


# --- prompts -----------------------------------------------------------------------------


async def test_prompt_references_and_field_substitution(
    fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "registry.yaml").write_text("review: 'Review the {kind} titled {input.title}.'\n")
    (tmp_path / "system.md").write_text("You are a careful reviewer. Earlier verdict: {last.verdict}")
    (tmp_path / "lib.yaml").write_text("personas:\n  critic:\n    system: 'Be harsh about {input.title}.'\n")
    monkeypatch.setenv("AGENTFLOW_PROMPTS_DIR", str(tmp_path))
    monkeypatch.setenv("AGENTFLOW_PROMPTS_FILE", str(tmp_path / "registry.yaml"))
    fake.script({"content": "fine"}, {"content": "fine"})
    step_input = {"title": "Otters", "kind": "essay"}

    await run(
        {"model": model(fake), "system": "file:system.md", "prompt": "prompt:review"},
        services(),
        step_input,
        {"verdict": "pass"},
    )
    await run(
        {"model": model(fake), "system": "yaml:lib.yaml#personas.critic.system", "prompt": "{input.kind}!"},
        services(),
        step_input,
    )

    first, second = (r["body"]["messages"] for r in fake.requests)
    assert first == [
        {"role": "system", "content": "You are a careful reviewer. Earlier verdict: pass"},
        {"role": "user", "content": "Review the essay titled Otters."},
    ]
    assert second[0]["content"] == "Be harsh about Otters." and second[1]["content"] == "essay!"


async def test_missing_field_fails_before_any_call(fake: FakeOpenAI) -> None:
    with pytest.raises(AgentError) as info:
        await run({"model": model(fake), "prompt": "Summarise {input.body}"}, services(), {"title": "x"})
    assert "agent 'writer' prompt" in str(info.value) and "{input.body}" in str(info.value)
    assert fake.requests == []


async def test_unknown_prompt_name_fails(fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "registry.yaml").write_text("known: hi\n")
    monkeypatch.setenv("AGENTFLOW_PROMPTS_FILE", str(tmp_path / "registry.yaml"))
    with pytest.raises(AgentError, match="unknown prompt 'unknown'"):
        await run({"model": model(fake), "prompt": "prompt:unknown"}, services())
    assert fake.requests == []


# --- structured output ---------------------------------------------------------------------

VERDICT = {
    "type": "object",
    "properties": {"verdict": {"enum": ["accept", "reject"]}, "score": {"type": "integer", "minimum": 0}},
    "required": ["verdict", "score"],
}


async def test_structured_output_valid(fake: FakeOpenAI) -> None:
    fake.script({"content": '```json\n{"verdict": "accept", "score": 7}\n```'})
    config = {"model": model(fake), "system": "Judge essays.", "prompt": "Judge it.", "output_schema": VERDICT}
    output, ctx = await run(config, services())
    assert output == {"verdict": "accept", "score": 7}
    body = fake.requests[0]["body"]
    assert body["response_format"] == {"type": "json_object"}
    system = body["messages"][0]["content"]
    assert system.startswith("Judge essays.") and json.dumps(VERDICT) in system
    assert len(ctx.meter.llm_calls) == 1


async def test_structured_output_repaired_once(fake: FakeOpenAI) -> None:
    fake.script({"content": '{"verdict": "maybe", "score": 7}'}, {"content": '{"verdict": "reject", "score": 2}'})
    config = {"model": model(fake), "prompt": "Judge it.", "output_schema": VERDICT}
    output, ctx = await run(config, services())
    assert output == {"verdict": "reject", "score": 2}
    assert len(fake.requests) == 2
    repair = fake.requests[1]["body"]["messages"]
    assert repair[-2] == {"role": "assistant", "content": '{"verdict": "maybe", "score": 7}'}
    assert (
        repair[-1]["role"] == "user" and "verdict: 'maybe' is not one of ['accept', 'reject']" in repair[-1]["content"]
    )
    assert len(ctx.meter.llm_calls) == 2


async def test_structured_output_failing_after_repair(fake: FakeOpenAI) -> None:
    fake.script({"content": "I think it is good."}, {"content": '{"verdict": "accept"}'})
    config = {"model": model(fake), "prompt": "Judge it.", "output_schema": VERDICT}
    with pytest.raises(AgentError) as info:
        await run(config, services())
    assert (
        str(info.value) == "answer does not match output_schema after 1 repair: (root): 'score' is a required property"
    )
    assert "not valid JSON" in fake.requests[1]["body"]["messages"][-1]["content"]
    assert len(fake.requests) == 2


# --- tools ---------------------------------------------------------------------------------


async def test_tool_loop_runs_the_calls_and_returns_their_results(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script(
        {
            "tool_calls": [
                {"name": "math__add", "arguments": {"a": 2, "b": 3}},
                {"name": "math__mul", "arguments": {"a": 4, "b": 5}},
            ]
        },
        {"content": "2+3=5 and 4*5=20"},
    )
    config = {"model": model(fake), "prompt": "Compute.", "tools": ["math.add", "math.mul"]}
    output, ctx = await run(config, services(handler=handler))
    assert output["content"] == "2+3=5 and 4*5=20" and output["tool_calls"] == 2
    assert handler.calls == [("math.add", {"a": 2, "b": 3}), ("math.mul", {"a": 4, "b": 5})]

    first, second = (r["body"] for r in fake.requests)
    assert sorted(t["function"]["name"] for t in first["tools"]) == ["math__add", "math__mul"]
    assert first["tools"][0]["function"]["parameters"] == NUMBERS
    assistant, add_result, mul_result = second["messages"][-3:]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["math__add", "math__mul"]
    assert add_result == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": '{"result": 5}'}
    assert mul_result == {"role": "tool", "tool_call_id": assistant["tool_calls"][1]["id"], "content": '{"result": 20}'}
    assert [(r["tool"], r["outcome"]) for r in ctx.meter.tool_calls] == [("math.add", "ok"), ("math.mul", "ok")]
    assert len(ctx.meter.llm_calls) == 2


async def test_tool_not_listed_is_denied_and_the_model_told(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script({"tool_calls": [{"name": "vault", "arguments": {"a": 1, "b": 1}}]}, {"content": "I may not."})
    config = {"model": model(fake), "prompt": "Read the vault.", "tools": ["math.add"]}
    output, ctx = await run(config, services(handler=handler))
    assert output["content"] == "I may not."
    assert handler.calls == []
    [record] = ctx.meter.tool_calls
    assert (record["tool"], record["outcome"]) == ("vault", "denied")
    tool_message = fake.requests[1]["body"]["messages"][-1]
    assert tool_message["role"] == "tool"
    assert tool_message["content"].startswith("error: tool 'vault' is not listed in agent 'writer' tools")


async def test_bad_tool_arguments_are_reported_to_the_model(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script(
        {
            "tool_calls": [
                {"name": "math__add", "arguments": '{"a": 1, "b": '},
                {"name": "math__add", "arguments": {"a": "one", "b": 2}},
            ]
        },
        {"content": "sorry"},
    )
    config = {"model": model(fake), "prompt": "Add.", "tools": ["math.add"]}
    _, ctx = await run(config, services(handler=handler))
    bad_json, bad_schema = fake.requests[1]["body"]["messages"][-2:]
    assert bad_json["content"].startswith("error: the arguments of math__add are not valid JSON")
    assert bad_schema["content"].startswith("error: tool 'math.add' input does not match its schema: a:")
    assert handler.calls == []
    assert [r["outcome"] for r in ctx.meter.tool_calls] == ["invalid_input"]


async def test_tool_loop_stops_after_max_iterations(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script({"tool_calls": [{"name": "math__add", "arguments": {"a": 1, "b": 1}}]})
    config = {"model": model(fake), "prompt": "Loop.", "tools": ["math.add"], "max_iterations": 2}
    with pytest.raises(AgentError, match=r"^tool loop did not finish within 2 iterations$"):
        await run(config, services(handler=handler))
    assert len(handler.calls) == 2
    assert len(fake.requests) == 3


async def test_unknown_tool_in_settings_fails_the_step(fake: FakeOpenAI) -> None:
    config = {"model": model(fake), "prompt": "x", "tools": ["does_not_exist"]}
    with pytest.raises(AgentError, match="unknown tool 'does_not_exist'"):
        await run(config, services(handler=ArithmeticHandler()))
    assert fake.requests == []


async def test_tool_denied_by_tenant_policy_fails_the_step(fake: FakeOpenAI) -> None:
    svc = services(handler=ArithmeticHandler())
    assert svc.tools is not None
    svc.tools.config = ToolsConfig.model_validate(
        {**svc.tools.config.model_dump(), "tenant_policies": {"acme": {"allowed_tools": ["math.add"]}}}
    )
    config = {"model": model(fake), "prompt": "x", "tools": ["math.add", "math.mul"]}
    with pytest.raises(AgentError, match=r"tool 'math\.mul' is not in the tenant's allowed tools"):
        await run(config, svc)
    assert fake.requests == []


# --- retries, fallbacks, failures ------------------------------------------------------------


async def test_429_with_retry_after_is_retried_after_the_pause(fake: FakeOpenAI) -> None:
    fake.script({"status": 429, "headers": {"Retry-After": "1"}, "message": "slow down"}, {"content": "finally"})
    started = time.monotonic()
    output, ctx = await run({"model": model(fake), "prompt": "Hi", "max_retries": 2}, services())
    elapsed = time.monotonic() - started
    assert output["content"] == "finally"
    assert len(fake.requests) == 2
    assert elapsed >= 1.0
    assert len(ctx.meter.llm_calls) == 1  # the refused attempt cost nothing


class _WithHeaders(Exception):
    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("scripted")
        self.litellm_response_headers = headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": email.utils.formatdate(1_000_030.0, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(999_000.0, usegmt=True)}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(_WithHeaders(headers), now=1_000_000.0) == expected


def test_backoff_caps_the_pause_and_jitters_without_a_hint() -> None:
    assert backoff_s(0, 3600.0) == 60.0
    assert backoff_s(3, 2.0) == 2.0
    pauses = {backoff_s(2, None) for _ in range(20)}
    assert all(1.0 <= p <= 2.0 for p in pauses) and len(pauses) > 1
    assert backoff_s(50, None) <= 30.0


def test_fences_are_stripped() -> None:
    assert strip_fences('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert strip_fences("Here it is:\n```\n[1]\n```") == "[1]"
    assert strip_fences('{"code": "```x```"}') == '{"code": "```x```"}'


async def test_timeout_is_retried(fake: FakeOpenAI) -> None:
    fake.script({"content": "late", "delay": 1.5}, {"content": "on time"})
    output, _ = await run({"model": model(fake, timeout_s=0.5), "prompt": "Hi", "max_retries": 1}, services())
    assert output["content"] == "on time"
    assert len(fake.requests) == 2


async def test_server_error_falls_back_to_the_next_model(fake: FakeOpenAI) -> None:
    fake.script({"model": "primary", "status": 500, "message": "boom"}, {"model": "backup", "content": "from backup"})
    config = {
        "model": model(fake, "primary"),
        "fallback_models": [model(fake, "backup")],
        "prompt": "Hi",
        "max_retries": 1,
    }
    output, ctx = await run(config, services())
    assert output["content"] == "from backup" and output["model"] == "openai/backup"
    assert fake.models_requested() == ["primary", "primary", "backup"]
    assert [c.model for c in ctx.meter.llm_calls] == ["openai/backup"]


async def test_every_model_failing_lists_each_with_its_error(fake: FakeOpenAI) -> None:
    fake.script(
        {"model": "primary", "status": 503, "message": "overloaded"},
        {"model": "backup", "status": 401, "message": "bad key"},
    )
    config = {
        "model": model(fake, "primary"),
        "fallback_models": [model(fake, "backup")],
        "prompt": "Hi",
        "max_retries": 1,
    }
    with pytest.raises(AgentError) as info:
        await run(config, services())
    message = str(info.value)
    assert message.startswith("all 2 models failed: openai/primary: HTTP 503: ")
    assert "overloaded (after 2 attempts); openai/backup: HTTP 401: " in message and message.endswith("bad key")
    assert fake.models_requested() == ["primary", "primary", "backup"]


async def test_bad_request_fails_at_once(fake: FakeOpenAI) -> None:
    fake.script({"status": 400, "message": "max_tokens is too large for this model"})
    with pytest.raises(AgentError) as info:
        await run({"model": model(fake), "prompt": "Hi", "max_retries": 5}, services())
    assert str(info.value).startswith("model openai/my-llama: HTTP 400: ")
    assert str(info.value).endswith("max_tokens is too large for this model")
    assert len(fake.requests) == 1


async def test_unreachable_server_is_named_as_such() -> None:
    with FakeOpenAI() as gone:
        base = gone.api_base  # a port that was just ours and is now closed
    config = {"model": {"provider": "openai", "model": "m", "api_base": base, "api_key_secret": "LLM_KEY"},
              "prompt": "Hi", "max_retries": 1}  # fmt: skip
    with pytest.raises(AgentError, match=r"^model openai/m: cannot reach the model server: .*\(after 2 attempts\)$"):
        await run(config, services())


async def test_missing_api_key_secret_is_a_clear_error(fake: FakeOpenAI) -> None:
    with pytest.raises(AgentError, match=r"^secret 'NO_SUCH_KEY' is not configured for tenant 'acme' on this worker$"):
        await run({"model": model(fake, api_key_secret="NO_SUCH_KEY"), "prompt": "Hi"}, services())
    assert fake.requests == []


async def test_no_api_key_at_all_fails_at_once_without_retries(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A keyed provider (no api_base: not an on-prem server) with no key anywhere: the
    # client refuses before sending, and that is a configuration error, not an outage.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = {"model": {"provider": "openai", "model": "gpt-4o-mini"}, "prompt": "Hi", "max_retries": 3}
    began = time.monotonic()
    with pytest.raises(AgentError, match=r"no API key: set model.api_key_secret") as caught:
        await run(config, services())
    assert time.monotonic() - began < 1.0  # no backoff rounds
    assert "attempts" not in str(caught.value)


# --- streaming -----------------------------------------------------------------------------


async def test_streaming_forwards_coalesced_deltas_and_takes_usage_from_the_last_chunk(fake: FakeOpenAI) -> None:
    answer = " ".join(f"word{i}" for i in range(150))
    fake.script({"content": answer, "usage": {"prompt_tokens": 77, "completion_tokens": 333}})
    sink = ListSink()
    output, _ = await run({"model": model(fake), "prompt": "Talk.", "stream": True}, services(progress=sink))
    assert output["content"] == answer
    assert (output["usage"]["prompt_tokens"], output["usage"]["completion_tokens"]) == (77, 333)
    assert fake.requests[0]["body"]["stream"] is True
    assert fake.requests[0]["body"]["stream_options"] == {"include_usage": True}

    assert {e[:5] for e in sink.events} == {("acme", "run-1", "step-1", 2, "token")}
    deltas = [e[5] for e in sink.events]
    assert "".join(d["delta"] for d in deltas) == answer
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    # 150 words arrived as ~150 chunks; coalescing sends far fewer, none much over 200 chars.
    assert 1 <= len(deltas) < 50
    assert all(len(d["delta"]) < 200 + 10 for d in deltas)


async def test_streaming_with_tool_calls(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script({"tool_calls": [{"name": "math__mul", "arguments": {"a": 6, "b": 7}}]}, {"content": "It is 42."})
    sink = ListSink()
    config = {"model": model(fake), "prompt": "6*7?", "tools": ["math.mul"], "stream": True}
    output, _ = await run(config, services(handler=handler, progress=sink))
    assert handler.calls == [("math.mul", {"a": 6, "b": 7})]
    assert output["content"] == "It is 42." and output["tool_calls"] == 1
    assert "".join(e[5]["delta"] for e in sink.events) == "It is 42."
    assert fake.requests[1]["body"]["messages"][-1]["content"] == '{"result": 42}'


# --- budget ----------------------------------------------------------------------------------


async def test_budget_refuses_before_the_call(fake: FakeOpenAI) -> None:
    config = {"model": model(fake, max_tokens=1000), "prompt": "Hi", "max_cost_usd": 0.001}
    with pytest.raises(AgentError) as info:
        await run(config, services())
    # 1000 completion tokens at $8 per million alone is $0.008.
    assert str(info.value).startswith("budget: this call may cost up to $0.008")
    assert str(info.value).endswith("step spent $0 of max_cost_usd $0.001")
    assert fake.requests == []


async def test_token_budget_counts_earlier_calls_of_the_step(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script(
        {
            "tool_calls": [{"name": "math__add", "arguments": {"a": 1, "b": 2}}],
            "usage": {"prompt_tokens": 400, "completion_tokens": 50},
        },
        {"content": "3"},
    )
    config = {"model": model(fake, max_tokens=100), "prompt": "Add.", "tools": ["math.add"], "max_total_tokens": 600}
    with pytest.raises(
        AgentError, match=r"^budget: this call may use up to \d+ tokens .* step used 450 of max_total_tokens 600$"
    ):
        await run(config, services(handler=handler))
    assert len(fake.requests) == 1


async def test_budget_gate_sees_the_estimate_and_can_refuse(fake: FakeOpenAI) -> None:
    fake.script({"content": "ok"})
    allowing = RecordingGate()
    await run({"model": model(fake, max_tokens=100), "prompt": "Hi"}, services(budget=allowing))
    [(tenant, run_id, step, usd, tokens)] = allowing.calls
    assert (tenant, run_id, step) == ("acme", "run-1", "step-1")
    assert tokens > 100 and usd == pytest.approx((tokens - 100) * 2e-6 + 100 * 8e-6)

    refusing = RecordingGate(refuse=True)
    with pytest.raises(AgentError, match="tenant acme budget exhausted"):
        await run({"model": model(fake), "prompt": "Hi"}, services(budget=refusing))
    assert len(fake.requests) == 1


# --- budget reservation (the step envelope's "budget") --------------------------------------


def reserved(
    config: dict[str, Any], svc: WorkerServices, *, usd: float | None = None, tokens: int | None = None
) -> StepContext:
    ctx = context(config, svc)
    ctx.budget_usd, ctx.budget_tokens = usd, tokens
    return ctx


def with_costed_tools(handler: ArithmeticHandler, cost: float) -> WorkerServices:
    svc = services()
    tools = [_tool(t, d).model_copy(update={"cost_per_call": cost}) for t, d in [("math.add", "Add two numbers")]]
    svc.tools = ToolRuntime(ToolsConfig(tools=tools), {"command": handler}, secrets=svc.secrets)
    return svc


async def test_reservation_in_dollars_refuses_the_call_before_it_is_made(fake: FakeOpenAI) -> None:
    fake.script({"content": "never sent"})
    # No agent limits and no gate: the reservation alone must get past the early return.
    ctx = reserved({"model": model(fake, max_tokens=1000), "prompt": "Hi"}, services(), usd=0.001)
    with pytest.raises(AgentError) as info:
        await LlmAgent().run(ctx)
    message = str(info.value)
    # 1000 completion tokens at $8 per million alone is $0.008.
    assert message.startswith("budget_exceeded: this call may cost up to $0.008")
    assert "(openai/my-llama, " in message and " prompt + 1000 max_tokens)" in message
    assert message.endswith("; the step's budget reservation is $0.001 (spent $0)")
    assert fake.requests == []
    assert ctx.meter.llm_calls == []


async def test_reservation_in_tokens_refuses_the_call_before_it_is_made(fake: FakeOpenAI) -> None:
    fake.script({"content": "never sent"})
    ctx = reserved({"model": model(fake, max_tokens=1000), "prompt": "Hi"}, services(), tokens=500)
    with pytest.raises(
        AgentError,
        match=r"^budget_exceeded: this call may use up to \d+ tokens \(\d+ prompt \+ 1000 max_tokens\); "
        r"the step's budget reservation is 500 tokens \(used 0\)$",
    ):
        await LlmAgent().run(ctx)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("usd", "tokens", "expected"),
    [
        (None, 600, r"the step's budget reservation is 600 tokens \(used 450\)$"),
        # First call: 400 prompt at $2/M + 50 completion at $8/M = $0.0012.
        (0.0015, None, r"the step's budget reservation is \$0\.0015 \(spent \$0\.0012\)$"),
    ],
    ids=["tokens", "dollars"],
)
async def test_reservation_counts_earlier_calls_of_the_step(
    fake: FakeOpenAI, usd: float | None, tokens: int | None, expected: str
) -> None:
    handler = ArithmeticHandler()
    fake.script(
        {
            "tool_calls": [{"name": "math__add", "arguments": {"a": 1, "b": 2}}],
            "usage": {"prompt_tokens": 400, "completion_tokens": 50},
        },
        {"content": "3"},
    )
    config = {"model": model(fake, max_tokens=100), "prompt": "Add.", "tools": ["math.add"]}
    ctx = reserved(config, services(handler=handler), usd=usd, tokens=tokens)
    with pytest.raises(AgentError, match="^budget_exceeded: .*" + expected):
        await LlmAgent().run(ctx)
    assert len(fake.requests) == 1
    assert handler.calls == [("math.add", {"a": 1, "b": 2})]


async def test_big_enough_reservation_lets_the_step_run(fake: FakeOpenAI) -> None:
    fake.script({"content": "Hello.", "usage": {"prompt_tokens": 1000, "completion_tokens": 250}})
    ctx = reserved({"model": model(fake, max_tokens=1000), "prompt": "Hi"}, services(), usd=0.05, tokens=5000)
    output = await LlmAgent().run(ctx)
    assert output["content"] == "Hello."
    assert len(fake.requests) == 1
    assert ctx.meter.cost_usd == pytest.approx(0.004) and ctx.meter.total_tokens == 1250


async def test_reservation_and_agent_limits_each_keep_their_own_message(fake: FakeOpenAI) -> None:
    base = {"model": model(fake, max_tokens=1000), "prompt": "Hi"}
    with pytest.raises(AgentError, match=r"^budget_exceeded: .*reservation is \$0\.001 \(spent \$0\)$"):
        await LlmAgent().run(reserved({**base, "max_cost_usd": 1.0}, services(), usd=0.001))
    with pytest.raises(AgentError, match=r"^budget: .*step spent \$0 of max_cost_usd \$0\.001$"):
        await LlmAgent().run(reserved({**base, "max_cost_usd": 0.001}, services(), usd=1.0))
    assert fake.requests == []


async def test_tool_call_past_the_reservation_is_refused_and_the_model_told(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    fake.script(
        {
            "tool_calls": [{"name": "math__add", "arguments": {"a": 2, "b": 3}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10},
        },
        {"content": "I could not add them.", "usage": {"prompt_tokens": 120, "completion_tokens": 10}},
    )
    config = {"model": model(fake, max_tokens=10), "prompt": "Add.", "tools": ["math.add"]}
    ctx = reserved(config, with_costed_tools(handler, 0.05), usd=0.01)
    output = await LlmAgent().run(ctx)
    assert output["content"] == "I could not add them."
    assert handler.calls == []
    [record] = ctx.meter.tool_calls
    expected = (
        "budget_exceeded: tool 'math.add' costs $0.05 per call; the step's budget reservation is $0.01 (spent $0.00028)"
    )
    assert (record["outcome"], record["cost_usd"], record["error"]) == ("budget_exceeded", 0.0, expected)
    assert fake.requests[1]["body"]["messages"][-1]["content"] == "error: " + expected
    assert ctx.meter.cost_usd <= 0.01


async def test_tool_call_within_the_reservation_runs_and_is_charged(fake: FakeOpenAI) -> None:
    handler = ArithmeticHandler()
    svc = with_costed_tools(handler, 0.05)
    assert svc.tools is not None
    # Exactly the reservation is allowed: only going past it is refused.
    ctx = reserved({}, svc, usd=0.05)
    outcome = await svc.tools.call(ctx, "math.add", {"a": 2, "b": 3}, allowed=["math.add"])
    assert outcome.ok and outcome.output == {"result": 5}
    assert outcome.record["cost_usd"] == 0.05
    again = await svc.tools.call(ctx, "math.add", {"a": 1, "b": 1}, allowed=["math.add"])
    assert (again.ok, again.record["outcome"]) == (False, "budget_exceeded")
    assert again.error == (
        "budget_exceeded: tool 'math.add' costs $0.05 per call; the step's budget reservation is $0.05 (spent $0.05)"
    )
    assert handler.calls == [("math.add", {"a": 2, "b": 3})]


async def test_tool_agent_fails_its_step_when_the_call_is_past_the_reservation() -> None:
    from agentflow_worker.agents.tool_agent import ToolAgent

    handler = ArithmeticHandler()
    ctx = reserved({"tool": "math.add"}, with_costed_tools(handler, 0.05), usd=0.04)
    ctx.payload = {"input": {"a": 1, "b": 2}}
    with pytest.raises(AgentError, match=r"^budget_exceeded: tool 'math\.add' costs \$0\.05 per call; .*\$0\.04 "):
        await ToolAgent().run(ctx)
    assert handler.calls == []


# --- import cost -----------------------------------------------------------------------------


def test_litellm_is_not_imported_by_the_agent_module_nor_the_worker() -> None:
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import agentflow_worker.agents.llm\n"
        "assert 'litellm' not in sys.modules, 'agents.llm imported litellm'\n"
        "import agentflow_worker.worker\n"
        "assert 'litellm' not in sys.modules, 'the worker imported litellm'\n"
        "import agentflow_worker.agents.registry\n"
        "assert 'litellm' not in sys.modules, 'the agent registry imported litellm'\n"
        "print(round(time.perf_counter() - t, 3))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # litellm alone takes seconds to import; without it the worker starts well under that.
    assert float(result.stdout.strip()) < 5.0
