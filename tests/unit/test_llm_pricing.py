"""Prices of LLM calls: the worker's table, litellm's bundled map, or unknown (and said so)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from agentflow_worker.agents import llm_pricing
from agentflow_worker.agents.llm_pricing import call_cost, cost_of, count_prompt_tokens, litellm_module

TABLE = {"my-llama": {"input_per_million": 2.0, "output_per_million": 6.0}}


def test_known_model_is_priced_from_the_bundled_map() -> None:
    litellm = litellm_module()
    entry = litellm.model_cost["gpt-4o-mini"]
    cost, source = call_cost("openai/gpt-4o-mini", "gpt-4o-mini", 1000, 500, {})
    assert source == "litellm"
    assert cost > 0
    assert cost == pytest.approx(1000 * entry["input_cost_per_token"] + 500 * entry["output_cost_per_token"])


def test_import_pricing_and_counting_never_touch_the_network() -> None:
    # In a fresh interpreter (litellm not yet imported), every DNS lookup and connect is
    # recorded and refused: the price map and tokenizers must come from the package.
    code = """
import socket
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by the test")
socket.getaddrinfo = refuse
socket.create_connection = refuse
socket.socket.connect = lambda self, address: refuse(address)
from agentflow_worker.agents.llm_pricing import litellm_module, cost_of, count_prompt_tokens
litellm = litellm_module()
messages = [{"role": "user", "content": "hello " * 50}]
assert count_prompt_tokens("ollama/llama-3-8b", messages) > 0
assert count_prompt_tokens("anthropic/claude-3-haiku-20240307", messages) > 0
assert cost_of("openai/gpt-4o-mini", "gpt-4o-mini", 1000, 1000, {})[1] == "litellm"
print("ATTEMPTS", attempts)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("LITELLM_LOCAL_MODEL_COST_MAP", "HF_HUB_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ATTEMPTS []" in result.stdout, result.stdout


@pytest.mark.parametrize("key", ["my-llama", "openai/my-llama"])
def test_table_model_by_either_key(key: str) -> None:
    table = {key: TABLE["my-llama"]}
    cost, source = call_cost("openai/my-llama", "my-llama", 1_000_000, 500_000, table)
    assert source == "config"
    assert cost == pytest.approx(2.0 + 3.0)


def test_table_wins_over_the_bundled_map() -> None:
    table = {"gpt-4o-mini": {"input_per_million": 100.0, "output_per_million": 0.0}}
    cost, source = cost_of("openai/gpt-4o-mini", "gpt-4o-mini", 10_000, 10, table)
    assert source == "config"
    assert cost == pytest.approx(1.0)


def test_unknown_model_costs_zero_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    llm_pricing._warned_unknown.discard("hosted_vllm/made-up-model-7b")
    with caplog.at_level(logging.WARNING, logger="agentflow.llm"):
        first = call_cost("hosted_vllm/made-up-model-7b", "made-up-model-7b", 100, 100, TABLE)
        second = call_cost("hosted_vllm/made-up-model-7b", "made-up-model-7b", 100, 100, TABLE)
    assert first == second == (0.0, "unknown")
    warnings = [r for r in caplog.records if "made-up-model-7b" in r.getMessage()]
    assert len(warnings) == 1
    assert "llm_prices" in warnings[0].getMessage()


def test_token_counter_works_offline_for_models_with_hub_tokenizers() -> None:
    messages = [{"role": "user", "content": "How many tokens is this sentence? " * 20}]
    # llama-3 names would make litellm fetch a tokenizer from the Hugging Face hub; the
    # worker turns that off, so this counts with the bundled tiktoken encoding.
    for route in ("ollama/llama-3-8b-instruct", "openai/gpt-4o-mini", "openai/my-llama"):
        count = count_prompt_tokens(route, messages)
        assert 100 < count < 300, (route, count)
    assert litellm_module().disable_hf_tokenizer_download is True
