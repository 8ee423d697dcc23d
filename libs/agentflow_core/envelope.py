"""Canonically hashed message envelopes exchanged between control plane and workers.

An envelope is a JSON object with a top-level ``hash`` member equal to
``"sha256:" + hex(SHA-256(JCS(envelope without "hash")))``. A result envelope carries
``step_hash``, the hash of the step envelope it answers, which chains the two. Anyone can
re-verify a stored envelope with a stock RFC 8785 library::

    body = json.loads(raw); claimed = body.pop("hash")
    assert claimed == "sha256:" + hashlib.sha256(rfc8785.dumps(body)).hexdigest()

Envelopes are plain dicts (TypedDicts for the type checker) rather than pydantic models
because they sit on the per-step hot path; :func:`check_step` and :func:`check_result`
validate their shape at the boundary instead.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any, Literal, NotRequired, TypedDict, cast

import orjson

from agentflow_core.canonical import HASH_PREFIX, canonicalize, canonicalize_portable
from agentflow_core.errors import CanonicalizationError, EnvelopeRejected

ENVELOPE_VERSION = 1

ResultStatus = Literal["succeeded", "failed", "timeout", "rejected"]
RESULT_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "timeout", "rejected"})


class AgentCall(TypedDict):
    """What a worker needs to know about the agent: its name, type and settings."""

    name: str
    type: str
    config: dict[str, Any]
    timeout_s: float | int | None
    #: specs of the workflow-declared tools this agent names (absent when none)
    tools: NotRequired[list[dict[str, Any]]]


class StepBudget(TypedDict, total=False):
    """The worst-case amounts the control plane reserved for this attempt; the worker
    refuses any model or tool call that could take the step past them."""

    max_cost_usd: float | int
    max_tokens: int


class StepEnvelope(TypedDict):
    v: int
    kind: Literal["step"]
    tenant: str
    run: str
    step: str
    seq: int
    attempt: int
    agent: AgentCall
    payload: dict[str, Any]
    #: the attempt's budget reservation (hard budgets); absent: no cap
    budget: NotRequired[StepBudget]
    hash: NotRequired[str]


class ResultEnvelope(TypedDict):
    v: int
    kind: Literal["result"]
    tenant: str
    run: str
    step: str
    attempt: int
    step_hash: str
    status: str
    output: Any
    error: str | None
    worker: str
    delivery: int
    started_us: int
    finished_us: int
    #: tokens and dollars the step spent (LLM calls, tool calls); absent when nothing
    usage: NotRequired[dict[str, Any]]
    #: one record per tool call (tool, input/output hashes, duration, cost, outcome)
    tool_calls: NotRequired[list[dict[str, Any]]]
    hash: NotRequired[str]


class StartedNotice(TypedDict):
    """Sent by a worker when a step runs longer than its notice delay (not hashed state)."""

    v: int
    kind: Literal["started"]
    tenant: str
    run: str
    step: str
    attempt: int
    worker: str
    delivery: int
    started_us: int
    hash: NotRequired[str]


def seal(body: dict[str, Any]) -> tuple[bytes, str]:
    """Hash ``body`` (which must not contain ``hash``) and return (wire bytes, hash).

    The wire form is the canonical serialization with the ``hash`` member appended, so
    sealing costs one canonicalization. Raises :class:`CanonicalizationError`.
    """
    if "hash" in body:
        raise CanonicalizationError("an envelope body to seal must not contain 'hash'")
    canonical = canonicalize_portable(body)
    digest = HASH_PREFIX + hashlib.sha256(canonical).hexdigest()
    if canonical == b"{}":
        wire = b'{"hash":"' + digest.encode() + b'"}'
    else:
        wire = canonical[:-1] + b',"hash":"' + digest.encode() + b'"}'
    return wire, digest


def open_envelope(raw: bytes) -> tuple[dict[str, Any], str]:
    """Parse ``raw`` and verify its hash. Returns (envelope without hash, hash).

    Raises :class:`EnvelopeRejected` naming the problem when the bytes are not a JSON
    object, carry no hash, or the hash does not match the content.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeRejected(f"malformed envelope: not JSON ({exc})") from exc
    if type(body) is not dict:
        raise EnvelopeRejected("malformed envelope: not a JSON object")
    claimed = body.pop("hash", None)
    if type(claimed) is not str or not claimed.startswith(HASH_PREFIX):
        raise EnvelopeRejected("malformed envelope: missing or invalid 'hash' member")
    try:
        actual = HASH_PREFIX + hashlib.sha256(canonicalize(body)).hexdigest()
    except CanonicalizationError as exc:
        raise EnvelopeRejected(f"malformed envelope: {exc.message}") from exc
    if not claimed.isascii() or not hmac.compare_digest(actual, claimed):
        raise EnvelopeRejected(f"hash mismatch: envelope claims {claimed}, content hashes to {actual}")
    return body, claimed


def _require(body: dict[str, Any], field: str, typ: type | tuple[type, ...]) -> Any:
    value = body.get(field)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise EnvelopeRejected(f"malformed envelope: field '{field}' missing or of wrong type")
    return value


def check_step(body: dict[str, Any]) -> StepEnvelope:
    """Validate the shape of a step envelope (already hash-verified)."""
    if body.get("kind") != "step" or body.get("v") != ENVELOPE_VERSION:
        raise EnvelopeRejected("malformed envelope: not a v1 step envelope")
    for field in ("tenant", "run", "step"):
        _require(body, field, str)
    _require(body, "seq", int)
    _require(body, "attempt", int)
    _require(body, "payload", dict)
    agent = _require(body, "agent", dict)
    _require(agent, "name", str)
    _require(agent, "type", str)
    _require(agent, "config", dict)
    if "budget" in body:
        _check_budget(body["budget"])
    return cast(StepEnvelope, body)


def _check_budget(budget: Any) -> None:
    if not isinstance(budget, dict):
        raise EnvelopeRejected("malformed envelope: field 'budget' must be an object")
    if "max_cost_usd" in budget:
        cost = budget["max_cost_usd"]
        # A cap the worker cannot compare against (NaN, a bool, a string) would let the
        # step spend without limit; refuse it rather than guess.
        if (
            isinstance(cost, bool)
            or not isinstance(cost, (int, float))
            or (isinstance(cost, float) and not math.isfinite(cost))
            or cost < 0
        ):
            raise EnvelopeRejected(
                f"malformed envelope: field 'budget' max_cost_usd must be a finite number >= 0, got {cost!r:.40}"
            )
    if "max_tokens" in budget:
        tokens = budget["max_tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise EnvelopeRejected(
                f"malformed envelope: field 'budget' max_tokens must be an integer >= 0, got {tokens!r:.40}"
            )


def check_result(body: dict[str, Any]) -> ResultEnvelope | StartedNotice:
    """Validate the shape of a result envelope or a started notice (hash-verified)."""
    kind = body.get("kind")
    if body.get("v") != ENVELOPE_VERSION or kind not in ("result", "started"):
        raise EnvelopeRejected("malformed envelope: not a v1 result envelope")
    for field in ("tenant", "run", "step", "worker"):
        _require(body, field, str)
    for field in ("attempt", "delivery", "started_us"):
        _require(body, field, int)
    if kind == "started":
        return cast(StartedNotice, body)
    _require(body, "step_hash", str)
    _require(body, "finished_us", int)
    if body.get("status") not in RESULT_STATUSES:
        raise EnvelopeRejected("malformed envelope: field 'status' is not a known status")
    if "usage" in body and not isinstance(body["usage"], dict):
        raise EnvelopeRejected("malformed envelope: field 'usage' must be an object")
    if "tool_calls" in body and not isinstance(body["tool_calls"], list):
        raise EnvelopeRejected("malformed envelope: field 'tool_calls' must be a list")
    return cast(ResultEnvelope, body)
