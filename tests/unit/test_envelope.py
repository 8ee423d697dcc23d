"""Sealing, opening and shape checks of the hashed envelopes."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentflow_core.canonical import content_hash
from agentflow_core.envelope import check_result, check_step, open_envelope, seal
from agentflow_core.errors import CanonicalizationError, EnvelopeRejected

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
STEP_HASH = "sha256:" + "ab" * 32


def step_body() -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "step",
        "tenant": "acme",
        "run": str(uuid.UUID(int=1)),
        "step": str(uuid.UUID(int=2)),
        "seq": 3,
        "attempt": 1,
        "agent": {
            "name": "summarize",
            "type": "llm",
            "config": {"model": "m-1", "temperature": 0.2},
            "timeout_s": 30,
        },
        "payload": {"text": "Grüße \U0001f600", "items": [1, 2, 3], "flag": True},
    }


def result_body() -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "result",
        "tenant": "acme",
        "run": str(uuid.UUID(int=1)),
        "step": str(uuid.UUID(int=2)),
        "attempt": 1,
        "step_hash": STEP_HASH,
        "status": "succeeded",
        "output": {"summary": "ok", "score": 0.75, "tags": ["a", "b"]},
        "error": None,
        "worker": "worker-1",
        "delivery": 1,
        "started_us": 1_718_000_000_000_000,
        "finished_us": 1_718_000_000_123_456,
    }


def started_body() -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "started",
        "tenant": "acme",
        "run": str(uuid.UUID(int=1)),
        "step": str(uuid.UUID(int=2)),
        "attempt": 1,
        "worker": "worker-1",
        "delivery": 2,
        "started_us": 1_718_000_000_000_000,
    }


BODIES = [step_body, result_body, started_body, dict]


def stock_verify(raw: bytes) -> tuple[dict[str, Any], str]:
    """Re-verify with nothing but the standard library and the reference JCS library."""
    body = json.loads(raw)
    claimed = body.pop("hash")
    assert claimed == "sha256:" + hashlib.sha256(rfc8785.dumps(body)).hexdigest()
    return body, claimed


def reseal_with(raw: bytes, mutate: Any) -> bytes:
    """Parse ``raw``, apply ``mutate`` to the parsed envelope (hash kept), serialize."""
    envelope = orjson.loads(raw)
    mutate(envelope)
    return orjson.dumps(envelope)


# --- seal / open ------------------------------------------------------------------


@pytest.mark.parametrize("make", BODIES, ids=lambda f: f.__name__)
def test_round_trip(make: Any) -> None:
    body = make()
    wire, digest = seal(body)
    assert HASH_RE.fullmatch(digest)
    assert digest == content_hash(body)
    opened, claimed = open_envelope(wire)
    assert opened == body
    assert claimed == digest
    assert "hash" not in body, "seal must not mutate its argument"


@pytest.mark.parametrize("make", BODIES, ids=lambda f: f.__name__)
def test_wire_parses_to_body_plus_hash(make: Any) -> None:
    body = make()
    wire, digest = seal(body)
    assert json.loads(wire) == {**body, "hash": digest}
    assert orjson.loads(wire) == {**body, "hash": digest}
    # The wire form is the canonical body with the hash member appended.
    assert wire == rfc8785.dumps(body)[:-1] + b',"hash":"' + digest.encode() + b'"}' or body == {}


def test_empty_body() -> None:
    wire, digest = seal({})
    assert wire == b'{"hash":"' + digest.encode() + b'"}'
    assert digest == "sha256:" + hashlib.sha256(b"{}").hexdigest()
    assert open_envelope(wire) == ({}, digest)


@pytest.mark.parametrize("make", BODIES, ids=lambda f: f.__name__)
def test_stock_reverification_agrees(make: Any) -> None:
    body = make()
    wire, digest = seal(body)
    assert stock_verify(wire) == (body, digest)


def test_seal_refuses_non_canonicalizable_body() -> None:
    bad_bodies: list[dict[Any, Any]] = [
        {"x": float("nan")},
        {"x": 2**53},
        {"x": "\ud800"},
        {1: "x"},
    ]
    for bad in bad_bodies:
        with pytest.raises(CanonicalizationError):
            seal(bad)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
    # Integral floats in [2**53, 1e21) are written as plain digits and parse back as
    # out-of-range integers; see test_large_integral_floats_survive_the_round_trip.
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not 2**53 <= abs(f) < 1e21),
    st.text(max_size=10),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=5),
    ),
    max_leaves=20,
)
json_bodies = st.dictionaries(st.text(max_size=6).filter(lambda k: k != "hash"), json_values, max_size=6)


@SETTINGS
@given(json_bodies)
def test_round_trip_and_stock_reverification_property(body: dict[str, Any]) -> None:
    wire, digest = seal(body)
    # Floats like 1.0 come back as the int 1 (JCS writes "1"), so compare canonical forms.
    opened, claimed = open_envelope(wire)
    assert claimed == digest
    assert rfc8785.dumps(opened) == rfc8785.dumps(body)
    stock_body, stock_claimed = stock_verify(wire)
    assert stock_claimed == digest
    assert rfc8785.dumps(stock_body) == rfc8785.dumps(body)


# --- tampering ----------------------------------------------------------------------


def _tampered_values(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value, int(value)]
    if isinstance(value, int):
        return [value + 1, str(value), float(value) + 0.5]
    if isinstance(value, float):
        return [value + 1]
    if isinstance(value, str):
        return [value + "x", value.upper() + "!", ""] if value else ["x"]
    if value is None:
        return [0, "", False]
    if isinstance(value, dict):
        return [{**value, "extra": 1}, {}] if value else [{"extra": 1}]
    if isinstance(value, list):
        return [[*value, 0], [*value[::-1], None]]
    raise AssertionError(value)


def _tamper_cases() -> list[tuple[str, str, Any]]:
    cases = []
    for make in (step_body, result_body, started_body):
        for field, value in make().items():
            for replacement in _tampered_values(value):
                cases.append((make.__name__, field, replacement))
    return cases


@pytest.mark.parametrize(("kind", "field", "replacement"), _tamper_cases())
def test_tampering_any_field_is_rejected(kind: str, field: str, replacement: Any) -> None:
    wire, _ = seal(globals()[kind]())

    def mutate(envelope: dict[str, Any]) -> None:
        envelope[field] = replacement

    with pytest.raises(EnvelopeRejected, match="hash mismatch"):
        open_envelope(reseal_with(wire, mutate))


@pytest.mark.parametrize("make", [step_body, result_body], ids=lambda f: f.__name__)
def test_tampering_nested_fields_removing_and_adding_is_rejected(make: Any) -> None:
    wire, _ = seal(make())
    mutations = [
        lambda e: e.pop("attempt"),
        lambda e: e.update(injected=True),
        lambda e: e.update(extra=None),
    ]
    if make is step_body:
        mutations += [
            lambda e: e["agent"]["config"].update(temperature=0.3),
            lambda e: e["payload"]["items"].append(4),
            lambda e: e["payload"].update(text="Grüße \U0001f601"),
        ]
    else:
        mutations += [
            lambda e: e["output"]["tags"].reverse(),
            lambda e: e["output"].update(score=0.7500001),
        ]
    for mutate in mutations:
        with pytest.raises(EnvelopeRejected, match="hash mismatch"):
            open_envelope(reseal_with(wire, mutate))


def test_tampering_with_the_hash_is_rejected() -> None:
    wire, digest = seal(result_body())
    flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    for claimed in (flipped, digest.upper().replace("SHA256:", "sha256:"), "sha256:", digest + "0"):
        with pytest.raises(EnvelopeRejected, match="hash mismatch"):
            open_envelope(wire.replace(digest.encode(), claimed.encode()))
    # The hash of another envelope does not fit either.
    other = content_hash(step_body())
    with pytest.raises(EnvelopeRejected, match="hash mismatch"):
        open_envelope(wire.replace(digest.encode(), other.encode()))


def test_byte_level_tampering_never_escapes_as_another_error() -> None:
    wire, _ = seal(result_body())
    for i in range(len(wire)):
        for b in (0x20, 0x30, 0x61, 0x7B, 0xFF):
            if wire[i] == b:
                continue
            raw = wire[:i] + bytes([b]) + wire[i + 1 :]
            try:
                open_envelope(raw)
            except EnvelopeRejected:
                continue
            # A few edits only touch insignificant whitespace and keep the hash valid.
            assert orjson.loads(raw) == orjson.loads(wire)


def test_hash_is_independent_of_wire_key_order_and_whitespace() -> None:
    body = result_body()
    _, digest = seal(body)
    reordered = dict(reversed(list({**body, "hash": digest}.items())))
    raw = json.dumps(reordered, indent=2, ensure_ascii=True).encode()
    assert open_envelope(raw) == (body, digest)


# --- malformed input ----------------------------------------------------------------

VALID_LOOKING_HASH = '"sha256:' + "0" * 64 + '"'


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" ",
        b"{",
        b"}",
        b"not json",
        b"\xff\xfe\x00",
        b"\x00" * 8,
        b'{"a":1',
        b'{"a":1}}',
        b"{'a': 1}",
        b'{"a":"\xff","hash":' + VALID_LOOKING_HASH.encode() + b"}",
        b'{"a":"\\ud800","hash":' + VALID_LOOKING_HASH.encode() + b"}",
    ],
)
def test_garbage_is_rejected(raw: bytes) -> None:
    with pytest.raises(EnvelopeRejected, match="malformed envelope"):
        open_envelope(raw)


@pytest.mark.parametrize("raw", [b"[]", b'["hash"]', b"1", b'"sha256:00"', b"null", b"true", b"1.5"])
def test_non_object_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(EnvelopeRejected, match="not a JSON object"):
        open_envelope(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b'{"a":1}',
        b'{"a":1,"hash":null}',
        b'{"a":1,"hash":123}',
        b'{"a":1,"hash":["sha256:00"]}',
        b'{"a":1,"hash":"md5:00"}',
        b'{"a":1,"hash":"00"}',
        b'{"a":1,"hash":""}',
    ],
)
def test_missing_or_invalid_hash_is_rejected(raw: bytes) -> None:
    with pytest.raises(EnvelopeRejected, match="'hash'"):
        open_envelope(raw)


@pytest.mark.parametrize("token", [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"inf", b"nan", b"1e400", b"-1e400"])
def test_non_finite_number_tokens_are_rejected(token: bytes) -> None:
    _, digest = seal({"a": 1})
    raw = b'{"a":' + token + b',"hash":"' + digest.encode() + b'"}'
    with pytest.raises(EnvelopeRejected, match="malformed envelope"):
        open_envelope(raw)


@pytest.mark.parametrize("number", [2**53, -(2**53), 2**63, 2**64 - 1])
def test_integers_outside_the_jcs_domain_are_rejected(number: int) -> None:
    raw = b'{"a":' + str(number).encode() + b',"hash":' + VALID_LOOKING_HASH.encode() + b"}"
    with pytest.raises(EnvelopeRejected, match="malformed envelope"):
        open_envelope(raw)


@pytest.mark.parametrize("depth", [100, 300, 1000, 1023])
def test_deeply_nested_input_is_rejected_cleanly(depth: int) -> None:
    raw = b'{"a":' + b"[" * depth + b"]" * depth + b',"hash":' + VALID_LOOKING_HASH.encode() + b"}"
    with pytest.raises(EnvelopeRejected):
        open_envelope(raw)


def test_non_ascii_hash_claim_is_rejected() -> None:
    with pytest.raises(EnvelopeRejected):
        open_envelope('{"a":1,"hash":"sha256:\u00e9"}'.encode())


@pytest.mark.parametrize("number", [2.0**53, -(2.0**53), 1e16, 1e20, 9.99e20])
def test_large_integral_floats_are_refused_when_sealing(number: float) -> None:
    # Their JCS text is plain digits that parse back as an out-of-domain integer, so the
    # receiver could never verify the envelope: refuse at the sender instead.
    with pytest.raises(CanonicalizationError, match="round trip"):
        seal({"x": number})


@pytest.mark.parametrize("number", [0.5, 1e-7, 2.0**52, 1e21, 123.456])
def test_ordinary_floats_survive_the_round_trip(number: float) -> None:
    wire, digest = seal({"x": number})
    assert open_envelope(wire)[1] == digest
    assert stock_verify(wire)[1] == digest


def test_sealing_a_body_with_hash_is_refused() -> None:
    with pytest.raises(CanonicalizationError):
        seal({"a": 1, "hash": "sha256:00"})


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_envelope_rejected(raw: bytes) -> None:
    try:
        body, claimed = open_envelope(raw)
    except EnvelopeRejected:
        return
    # Only a genuinely valid envelope can get through.
    assert claimed == content_hash(body)


ascii_hash_claims = st.one_of(
    st.just("sha256:"),
    st.text(st.characters(max_codepoint=0x7F), max_size=80).map(lambda s: "sha256:" + s),
    st.text(st.characters(max_codepoint=0x7F), max_size=20),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.none(),
)


@SETTINGS
@given(json_bodies, ascii_hash_claims)
def test_arbitrary_claims_only_ever_raise_envelope_rejected(body: dict[str, Any], claim: Any) -> None:
    raw = orjson.dumps({**body, "hash": claim})
    with pytest.raises(EnvelopeRejected):
        open_envelope(raw)


# --- shape checks ---------------------------------------------------------------------


def test_check_step_accepts_good_shape() -> None:
    body = step_body()
    wire, _ = seal(body)
    assert check_step(body) is body
    assert check_step(open_envelope(wire)[0]) == body


@pytest.mark.parametrize("make", [result_body, started_body], ids=lambda f: f.__name__)
def test_check_result_accepts_good_shapes(make: Any) -> None:
    body = make()
    wire, _ = seal(body)
    assert check_result(body) is body
    assert check_result(open_envelope(wire)[0]) == body


@pytest.mark.parametrize("status", ["succeeded", "failed", "timeout", "rejected"])
def test_check_result_accepts_every_status(status: str) -> None:
    body = {**result_body(), "status": status, "error": None if status == "succeeded" else "x"}
    assert check_result(body) is body


def _without(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return body


def _with(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


STEP_FIELDS: list[tuple[tuple[str, ...], list[Any]]] = [
    (("tenant",), [None, 1, b"acme", ["acme"]]),
    (("run",), [None, 7, uuid.UUID(int=1)]),
    (("step",), [None, 7.0]),
    (("seq",), [None, "3", 3.0, True]),
    (("attempt",), [None, "1", 1.5, False]),
    (("payload",), [None, [], "x"]),
    (("agent",), [None, "summarize", []]),
    (("agent", "name"), [None, 1]),
    (("agent", "type"), [None, ["llm"]]),
    (("agent", "config"), [None, [], "x"]),
]


@pytest.mark.parametrize(("path", "bad_values"), STEP_FIELDS, ids=[".".join(p) for p, _ in STEP_FIELDS])
def test_check_step_rejects_bad_fields_naming_them(path: tuple[str, ...], bad_values: list[Any]) -> None:
    field = path[-1]
    with pytest.raises(EnvelopeRejected, match=f"'{field}'"):
        check_step(_without(step_body(), path))
    for bad in bad_values:
        with pytest.raises(EnvelopeRejected, match=f"'{field}'"):
            check_step(_with(step_body(), path, bad))


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", "result"), ("kind", None), ("v", 2), ("v", "1"), ("v", None)],
)
def test_check_step_rejects_wrong_kind_or_version(field: str, value: Any) -> None:
    with pytest.raises(EnvelopeRejected, match="not a v1 step envelope"):
        check_step(_with(step_body(), (field,), value))


RESULT_FIELDS: list[tuple[str, list[Any]]] = [
    ("tenant", [None, 1]),
    ("run", [None, 1]),
    ("step", [None, 1]),
    ("worker", [None, 1, ["w"]]),
    ("attempt", [None, "1", 1.0, True]),
    ("delivery", [None, "1", 1.0, False]),
    ("started_us", [None, "1", 1.0e15, True]),
    ("step_hash", [None, 1, b"sha256:"]),
    ("finished_us", [None, "1", 1.0e15, True]),
    ("status", [None, "ok", "SUCCEEDED", 1]),
]


@pytest.mark.parametrize(("field", "bad_values"), RESULT_FIELDS, ids=[f for f, _ in RESULT_FIELDS])
def test_check_result_rejects_bad_fields_naming_them(field: str, bad_values: list[Any]) -> None:
    with pytest.raises(EnvelopeRejected, match=f"'{field}'"):
        check_result(_without(result_body(), (field,)))
    for bad in bad_values:
        with pytest.raises(EnvelopeRejected, match=f"'{field}'"):
            check_result(_with(result_body(), (field,), bad))


@pytest.mark.parametrize("field", ["tenant", "run", "step", "worker", "attempt", "delivery", "started_us"])
def test_check_result_rejects_bad_started_notice_naming_field(field: str) -> None:
    with pytest.raises(EnvelopeRejected, match=f"'{field}'"):
        check_result(_without(started_body(), (field,)))
    with pytest.raises(EnvelopeRejected, match=f"'{field}'"):
        check_result(_with(started_body(), (field,), None))


def test_started_notice_needs_no_result_fields() -> None:
    body = started_body()
    assert "status" not in body and "finished_us" not in body
    assert check_result(body)["kind"] == "started"


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", "step"), ("kind", None), ("kind", "Result"), ("v", 0), ("v", "1")],
)
def test_check_result_rejects_wrong_kind_or_version(field: str, value: Any) -> None:
    with pytest.raises(EnvelopeRejected, match="not a v1 result envelope"):
        check_result(_with(result_body(), (field,), value))


def test_check_step_rejects_result_and_vice_versa() -> None:
    with pytest.raises(EnvelopeRejected):
        check_step(result_body())
    with pytest.raises(EnvelopeRejected):
        check_result(step_body())


def test_rejections_are_422_envelope_rejected() -> None:
    with pytest.raises(EnvelopeRejected) as info:
        open_envelope(b"garbage")
    assert info.value.status_code == 422
    assert info.value.code == "envelope_rejected"


# --- budget reservation (hard budgets) --------------------------------------------------


@pytest.mark.parametrize(
    "budget",
    [
        {},
        {"max_cost_usd": 0},
        {"max_cost_usd": 0.25},
        {"max_tokens": 0},
        {"max_tokens": 4096},
        {"max_cost_usd": 1.5, "max_tokens": 1000},
    ],
    ids=["empty", "zero-usd", "usd", "zero-tokens", "tokens", "both"],
)
def test_check_step_accepts_a_budget_and_it_survives_sealing(budget: dict[str, Any]) -> None:
    body = {**step_body(), "budget": budget}
    wire, _ = seal(body)
    assert check_step(body) is body
    assert check_step(open_envelope(wire)[0])["budget"] == budget


def test_check_step_accepts_an_integral_float_cost_that_jcs_turns_into_an_int() -> None:
    # JCS writes 2.0 as 2: the worker sees an int where the control plane had a float.
    wire, _ = seal({**step_body(), "budget": {"max_cost_usd": 2.0}})
    budget = check_step(open_envelope(wire)[0])["budget"]
    assert budget == {"max_cost_usd": 2} and type(budget["max_cost_usd"]) is int


@pytest.mark.parametrize("bad", [None, [], "1.0", 5, True])
def test_check_step_rejects_a_budget_that_is_not_an_object(bad: Any) -> None:
    with pytest.raises(EnvelopeRejected, match=r"^malformed envelope: field 'budget' must be an object$"):
        check_step({**step_body(), "budget": bad})


@pytest.mark.parametrize("bad", [-0.01, -1, True, False, "0.5", None, [1], float("nan"), float("inf")])
def test_check_step_rejects_a_bad_budget_cost_naming_it(bad: Any) -> None:
    with pytest.raises(EnvelopeRejected) as info:
        check_step({**step_body(), "budget": {"max_cost_usd": bad, "max_tokens": 10}})
    assert info.value.message.startswith(
        "malformed envelope: field 'budget' max_cost_usd must be a finite number >= 0, got "
    )


@pytest.mark.parametrize("bad", [-1, 1.0, 10.5, True, False, "10", None, {}])
def test_check_step_rejects_bad_budget_tokens_naming_them(bad: Any) -> None:
    with pytest.raises(EnvelopeRejected) as info:
        check_step({**step_body(), "budget": {"max_cost_usd": 1, "max_tokens": bad}})
    assert info.value.message.startswith("malformed envelope: field 'budget' max_tokens must be an integer >= 0, got ")


def test_budget_rejection_quotes_at_most_a_short_prefix_of_the_value() -> None:
    with pytest.raises(EnvelopeRejected) as info:
        check_step({**step_body(), "budget": {"max_tokens": "9" * 10_000}})
    assert len(info.value.message) < 150
