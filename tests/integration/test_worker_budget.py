"""The step envelope's ``budget`` reservation, through a real worker on real NATS.

An in-process :class:`Worker` consumes sealed step envelopes from JetStream, the way the
control plane sends them, and runs the ``llm`` agent against the fake OpenAI-compatible
server: the reservation must reach the agent's step context and stop a call that could
spend past it before any request is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from agentflow_bus.subjects import Names
from agentflow_core.envelope import check_result, open_envelope, seal
from agentflow_worker.agents.llm import LlmAgent
from agentflow_worker.secrets import SecretStore
from agentflow_worker.services import WorkerServices
from agentflow_worker.settings import WorkerSettings
from agentflow_worker.worker import Worker
from tests.support.fake_llm import FakeOpenAI
from tests.support.services import Services

TENANT = "acme"
PRICES = {"my-llama": {"input_per_million": 2.0, "output_per_million": 8.0}}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def bus(services: Services) -> AsyncIterator[tuple[Client, Names]]:
    """A running worker on a prefix of its own, and a client to talk to it."""
    prefix = f"b{secrets.token_hex(4)}"
    settings = WorkerSettings(
        nats_url=services.nats_url,
        nats_prefix=prefix,
        worker_name="budget-test",
        worker_started_notice_ms=60_000,
    )
    svc = WorkerServices(secrets=SecretStore(environ={"AGENTFLOW_SECRET_LLM_KEY": "sk-test-123"}), llm_prices=PRICES)
    worker = Worker(settings, agents={"llm": LlmAgent()}, services=svc)
    await worker.start()
    nc = await nats.connect(services.nats_url)
    names = Names(prefix)
    try:
        yield nc, names
    finally:
        await worker.stop(drain_timeout_s=1)
        js = nc.jetstream()
        for stream in (names.steps_stream, names.results_stream):
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        with contextlib.suppress(Exception):
            await js.delete_key_value(names.workers_bucket)
        await nc.close()


def step(fake: FakeOpenAI, budget: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "kind": "step",
        "tenant": TENANT,
        "run": str(uuid.uuid4()),
        "step": str(uuid.uuid4()),
        "seq": 1,
        "attempt": 1,
        "agent": {
            "name": "writer",
            "type": "llm",
            "config": {
                "model": {
                    "provider": "openai",
                    "model": "my-llama",
                    "api_base": fake.api_base,
                    "api_key_secret": "LLM_KEY",
                    "max_tokens": 1000,
                },
                "prompt": "Hi",
            },
            "timeout_s": 60,
        },
        "payload": {"input": None, "last": None},
    }
    if budget is not None:
        body["budget"] = budget
    return body


async def dispatch(bus: tuple[Client, Names], body: dict[str, Any]) -> dict[str, Any]:
    """Publish the sealed step and wait for its result envelope."""
    nc, names = bus
    results: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_result(msg: Any) -> None:
        await results.put(msg.data)

    sub = await nc.subscribe(names.result_subject(TENANT), cb=on_result)
    try:
        wire, digest = seal(body)
        await nc.jetstream().publish(names.step_subject("default", TENANT), wire)
        async with asyncio.timeout(60):
            while True:
                result, _ = open_envelope(await results.get())
                checked = check_result(result)
                if checked["kind"] == "result" and checked["step"] == body["step"]:
                    assert checked["step_hash"] == digest
                    return result
    finally:
        await sub.unsubscribe()


async def test_step_with_too_small_a_reservation_fails_without_calling_the_model(
    bus: tuple[Client, Names], fake: FakeOpenAI
) -> None:
    fake.script({"content": "never sent"})
    result = await dispatch(bus, step(fake, {"max_cost_usd": 0.001, "max_tokens": 100_000}))
    assert result["status"] == "failed"
    # 1000 completion tokens at $8 per million alone is $0.008.
    assert result["error"].startswith("budget_exceeded: this call may cost up to $0.008")
    assert result["error"].endswith("the step's budget reservation is $0.001 (spent $0)")
    assert fake.requests == []
    assert "usage" not in result


async def test_token_reservation_reaches_the_agent(bus: tuple[Client, Names], fake: FakeOpenAI) -> None:
    fake.script({"content": "never sent"})
    result = await dispatch(bus, step(fake, {"max_tokens": 500}))
    assert result["status"] == "failed"
    assert result["error"].startswith("budget_exceeded: this call may use up to ")
    assert result["error"].endswith("the step's budget reservation is 500 tokens (used 0)")
    assert fake.requests == []


@pytest.mark.parametrize("budget", [{"max_cost_usd": 0.05, "max_tokens": 5000}, None], ids=["reserved", "absent"])
async def test_step_within_its_reservation_or_without_one_succeeds(
    bus: tuple[Client, Names], fake: FakeOpenAI, budget: Any
) -> None:
    fake.script({"content": "Hello.", "usage": {"prompt_tokens": 1000, "completion_tokens": 250}})
    result = await dispatch(bus, step(fake, budget))
    assert (result["status"], result["error"]) == ("succeeded", None)
    assert result["output"]["content"] == "Hello."
    assert result["usage"]["cost_usd"] == pytest.approx(0.004)
    assert len(fake.requests) == 1


async def test_malformed_budget_is_rejected_naming_the_field(bus: tuple[Client, Names], fake: FakeOpenAI) -> None:
    result = await dispatch(bus, step(fake, {"max_cost_usd": -1}))
    assert result["status"] == "rejected"
    assert result["error"].startswith(
        "step envelope rejected: malformed envelope: field 'budget' max_cost_usd must be a finite number >= 0"
    )
    assert fake.requests == []
