"""Differential tests: ``canonicalize`` must be byte-identical to ``rfc8785.dumps``.

The orjson fast path in :mod:`agentflow_core.canonical` is only sound if, for every value,
it either produces exactly the reference bytes or defers to the reference. These tests
generate JSON-like values aimed at the places where JSON serializers usually differ
(string escaping, UTF-16 key order, the ±2**53 integer boundary, float formatting) and
require that both implementations agree on the bytes, or both refuse the value, with
``canonicalize`` refusing through :class:`CanonicalizationError` only.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import re
import threading
from decimal import Decimal
from typing import Any

import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentflow_core.canonical import HASH_PREFIX, _fast_path_ok, canonicalize, content_hash
from agentflow_core.errors import CanonicalizationError

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MAX_SAFE = 2**53 - 1

# Characters where serializers tend to disagree: every short escape, other C0 controls,
# quote/backslash/solidus, DEL, C1 controls, the JavaScript line separators, the edges of
# the BMP and of the private-use area, and astral characters (surrogate pairs in UTF-16).
TRICKY_CHARS = [
    "\x00",
    "\x01",
    "\x08",
    "\t",
    "\n",
    "\x0b",
    "\x0c",
    "\r",
    "\x1f",
    " ",
    '"',
    "\\",
    "/",
    "\x7f",
    "\x80",
    "\x9f",
    "\u00e9",
    "\u2028",
    "\u2029",
    "\ud7ff",
    "\ue000",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U00010000",
    "\U0001f600",
    "\U0010ffff",
]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]

clean_chars = st.one_of(st.characters(codec="utf-8"), st.sampled_from(TRICKY_CHARS))
any_chars = st.one_of(clean_chars, st.sampled_from(LONE_SURROGATES))

clean_text = st.text(clean_chars, max_size=12)
any_text = st.text(any_chars, max_size=12)
# A small alphabet of order-sensitive characters, so one dict often holds keys that order
# differently by code point than by UTF-16 code unit (e.g. "\uffff" vs "\U0001f600").
order_keys = st.text(st.sampled_from(["a", "\x7f", "\ue000", "\uffff", *TRICKY_CHARS[-3:]]), max_size=3)

boundary_ints = st.one_of(
    st.integers(min_value=MAX_SAFE - 3, max_value=MAX_SAFE + 3),
    st.integers(min_value=-MAX_SAFE - 3, max_value=-MAX_SAFE + 3),
    st.sampled_from([0, -1, 1, 2**31, -(2**31), 2**63 - 1, -(2**63), 2**63, 2**64, -(2**64), 10**30]),
)
ints = st.one_of(st.integers(), boundary_ints)
safe_ints = st.integers(min_value=-MAX_SAFE, max_value=MAX_SAFE)

special_floats = st.sampled_from(
    [
        0.0,
        -0.0,
        1.0,
        -1.5,
        0.1,
        5e-324,
        -5e-324,
        2.2250738585072014e-308,
        1.7976931348623157e308,
        1e-7,
        1e-6,
        1e20,
        1e21,
        123456789012345680000.0,
        9007199254740991.0,
        9007199254740992.0,
        float("nan"),
        float("inf"),
        float("-inf"),
    ]
)
floats = st.one_of(st.floats(), special_floats)


def json_values(text: st.SearchStrategy[str], keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), ints, floats, text)
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(keys, children, max_size=6),
        ),
        max_leaves=25,
    )


# Values the fast path accepts: no floats, BMP keys without surrogates, safe integers.
bmp_chars = st.one_of(
    st.characters(codec="utf-8", max_codepoint=0xFFFF),
    st.sampled_from([c for c in TRICKY_CHARS if ord(c) <= 0xFFFF]),
)
fast_values = st.recursive(
    st.one_of(st.none(), st.booleans(), safe_ints, clean_text),
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(bmp_chars, max_size=8), children, max_size=6),
    ),
    max_leaves=25,
)


def assert_agrees(value: Any) -> None:
    """Both implementations give the same bytes, or both refuse the value."""
    try:
        expected = rfc8785.dumps(value)
    except Exception:
        with pytest.raises(CanonicalizationError):
            canonicalize(value)
        return
    assert canonicalize(value) == expected


@SETTINGS
@given(json_values(any_text, any_text))
def test_matches_reference_on_arbitrary_values(value: Any) -> None:
    assert_agrees(value)


@SETTINGS
@given(json_values(clean_text, st.one_of(clean_text, order_keys)))
def test_matches_reference_without_surrogates(value: Any) -> None:
    assert_agrees(value)


@SETTINGS
@given(st.dictionaries(order_keys, st.one_of(safe_ints, clean_text), max_size=8))
def test_key_order_matches_reference(value: dict[str, Any]) -> None:
    assert canonicalize(value) == rfc8785.dumps(value)


@SETTINGS
@given(fast_values)
def test_fast_path_values_match_reference(value: Any) -> None:
    # These values take the orjson path, so this is the differential test that matters.
    assert _fast_path_ok(value)
    assert canonicalize(value) == rfc8785.dumps(value)


@SETTINGS
@given(any_text)
def test_strings_match_reference(value: str) -> None:
    assert_agrees(value)
    assert_agrees({value: value})
    assert_agrees([value, {"k": value}])


@SETTINGS
@given(st.one_of(ints, floats))
def test_numbers_match_reference(value: int | float) -> None:
    assert_agrees(value)
    assert_agrees({"n": [value]})


@pytest.mark.parametrize("char", TRICKY_CHARS)
def test_tricky_characters(char: str) -> None:
    value = {char: char, "x" + char: [char * 3]}
    assert canonicalize(value) == rfc8785.dumps(value)


def test_every_non_surrogate_code_point_serializes_like_reference() -> None:
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for i in range(0, len(chars), 4096):
        chunk = "".join(chars[i : i + 4096])
        assert canonicalize([chunk]) == rfc8785.dumps([chunk])


def test_escapes_follow_rfc8785() -> None:
    value = '\b\t\n\f\r\x00\x1f\x7f\u2028\u2029/"\\\U0001f600'
    expected = '"\\b\\t\\n\\f\\r\\u0000\\u001f\x7f\u2028\u2029/\\"\\\\\U0001f600"'
    assert canonicalize(value) == expected.encode()


def test_astral_key_sorts_before_bmp_key_by_utf16_code_units() -> None:
    # U+1F600 is D83D DE00 in UTF-16, which sorts below FFFF (by code point it is above).
    value = {"\uffff": 1, "\U0001f600": 2}
    out = canonicalize(value)
    assert out == '{"\U0001f600":2,"\uffff":1}'.encode()
    assert out == rfc8785.dumps(value)


def test_key_order_mixed_bmp_and_astral() -> None:
    value = {"\ue000": 1, "\U00010000": 2, "\ud7ff": 3, "a": 4, "\U0010ffff": 5, "": 6}
    out = canonicalize(value)
    assert out == rfc8785.dumps(value)
    expected_order = ["", "a", "\ud7ff", "\U00010000", "\U0010ffff", "\ue000"]
    assert list(re.findall(r'"([^"]*)":', out.decode())) == expected_order


@pytest.mark.parametrize("n", [MAX_SAFE, -MAX_SAFE, MAX_SAFE - 1, 0])
def test_safe_integer_boundaries_accepted(n: int) -> None:
    assert canonicalize(n) == str(n).encode() == rfc8785.dumps(n)
    assert canonicalize({"n": n}) == rfc8785.dumps({"n": n})


@pytest.mark.parametrize("n", [2**53, -(2**53), 2**53 + 1, 2**63, -(2**64), 10**100])
def test_unsafe_integers_refused(n: int) -> None:
    with pytest.raises(rfc8785.CanonicalizationError):
        rfc8785.dumps(n)
    for value in (n, [n], {"n": n}):
        with pytest.raises(CanonicalizationError):
            canonicalize(value)


@pytest.mark.parametrize("f", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_refused(f: float) -> None:
    for value in (f, [f], {"f": f}):
        with pytest.raises(CanonicalizationError):
            canonicalize(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-0.0, b"0"),
        (1.0, b"1"),
        (1e21, b"1e+21"),
        (1e20, b"100000000000000000000"),
        (1e-7, b"1e-7"),
        (5e-324, b"5e-324"),
        (0.1, b"0.1"),
    ],
)
def test_floats_use_ecmascript_form(value: float, expected: bytes) -> None:
    assert canonicalize(value) == expected == rfc8785.dumps(value)


def test_bool_is_not_int() -> None:
    assert canonicalize(True) == b"true"
    assert canonicalize(False) == b"false"
    assert canonicalize(1) == b"1"
    assert canonicalize({"a": True, "b": 1, "c": False, "d": 0}) == b'{"a":true,"b":1,"c":false,"d":0}'
    assert content_hash([True]) != content_hash([1])
    assert content_hash({"x": False}) != content_hash({"x": 0})


@pytest.mark.parametrize("value", ["\ud800", ["ok", "\udfff"], {"\udc00": 1}, {"k": {"\ud800x": 1}}])
def test_lone_surrogates_refused(value: Any) -> None:
    with pytest.raises(CanonicalizationError):
        canonicalize(value)


class Color(enum.Enum):
    RED = "red"


class StrColor(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class MyStr(str):
    pass


class MyDict(dict[str, Any]):
    pass


@pytest.mark.parametrize(
    "value",
    [
        (1, "a", None),
        {"t": (1, [2, (3,)])},
        StrColor.RED,
        {"c": StrColor.RED},
        Level.HIGH,
        {"l": [Level.HIGH]},
        MyStr("x"),
        {MyStr("k"): MyStr("v")},
        MyDict(b=1, a=2),
        collections.OrderedDict([("b", 1), ("a", 2)]),
        {1: "int key"},
        {None: 1},
        {"a": 1, 2: "b"},
        {b"k": 1},
        b"bytes",
        {1, 2},
        Decimal("1.5"),
        Color.RED,
        object(),
        {"o": object()},
    ],
    ids=repr,
)
def test_non_json_types_agree_with_reference(value: Any) -> None:
    assert_agrees(value)


def _nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [1, 63, 64, 65, 254, 255, 256, 300, 600])
def test_deep_nesting_matches_reference(depth: int) -> None:
    value = _nested(depth)
    assert canonicalize(value) == rfc8785.dumps(value)


def _canonicalize_with_timeout(value: Any, seconds: float = 10.0) -> BaseException | bytes:
    """Run canonicalize in a daemon thread so a hang fails the test instead of the run."""
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(canonicalize(value))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "canonicalize did not terminate"
    return outcome[0]


def test_too_deep_nesting_raises_canonicalization_error() -> None:
    # The reference recurses per level; past the interpreter's limit it fails with
    # RecursionError, which must surface as CanonicalizationError.
    result = _canonicalize_with_timeout(_nested(5000))
    assert isinstance(result, CanonicalizationError)


def test_self_referential_containers_raise_instead_of_hanging() -> None:
    lst: list[Any] = []
    lst.append(lst)
    dct: dict[str, Any] = {}
    dct["a"] = [dct, dct]
    wide: list[Any] = []
    wide.extend([wide, wide, wide])
    for value in (lst, dct, wide, {"ok": 1, "loop": lst}):
        result = _canonicalize_with_timeout(value)
        assert isinstance(result, CanonicalizationError), result


HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")


@SETTINGS
@given(json_values(clean_text, clean_text))
def test_content_hash_matches_stock_sha256(value: Any) -> None:
    try:
        expected = rfc8785.dumps(value)
    except Exception:
        with pytest.raises(CanonicalizationError):
            content_hash(value)
        return
    try:
        reparsed = rfc8785.dumps(json.loads(expected))
    except Exception:
        reparsed = None
    if reparsed != expected:
        # e.g. 1e16 serializes as digits that parse back as an out-of-domain integer:
        # content_hash (and seal) refuse what a receiver could not re-verify.
        with pytest.raises(CanonicalizationError, match="round trip"):
            content_hash(value)
        return
    digest = content_hash(value)
    assert HASH_RE.fullmatch(digest)
    assert digest == HASH_PREFIX + hashlib.sha256(expected).hexdigest()


def test_content_hash_format() -> None:
    value: dict[str, Any] = {"b": [1, "two", None], "a": {"\U0001f600": True}}
    digest = content_hash(value)
    assert HASH_RE.fullmatch(digest)
    assert digest == "sha256:" + hashlib.sha256(rfc8785.dumps(value)).hexdigest()
    # Key order and whitespace of the input are irrelevant.
    assert digest == content_hash({"a": {"\U0001f600": True}, "b": [1, "two", None]})
    assert content_hash({}) == "sha256:" + hashlib.sha256(b"{}").hexdigest()


def test_content_hash_refuses_what_canonicalize_refuses() -> None:
    with pytest.raises(CanonicalizationError):
        content_hash({"x": float("nan")})
    with pytest.raises(CanonicalizationError):
        content_hash({"x": 2**53})


def test_canonicalization_error_is_validation_failure() -> None:
    with pytest.raises(CanonicalizationError) as info:
        canonicalize({"x": float("inf")})
    assert info.value.status_code == 422
    assert info.value.code == "not_canonicalizable"
