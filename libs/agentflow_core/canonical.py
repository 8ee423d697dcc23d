"""RFC 8785 (JCS) canonical JSON and SHA-256 content hashes.

``canonicalize`` returns exactly the bytes of ``rfc8785.dumps``. Hashing sits on the
engine's per-step path (at least four canonicalizations per step), and the pure-Python
reference costs about 100 µs for a typical envelope, so a fast path serializes with
orjson when the value is in the subset where orjson's output is provably identical to
JCS: dicts with string keys whose code points are all below U+10000 (so code-point order
equals JCS's UTF-16 order), strings without lone surrogates, integers within the
JavaScript safe range, booleans, null and lists, nested at most ``_MAX_FAST_DEPTH`` deep.
Anything else (any float, an astral key, a subclass, a big integer, deep or cyclic
nesting) goes to ``rfc8785`` itself, which either produces the canonical form or raises.
``tests/unit/test_canonical.py`` proves the two agree with differential property tests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson
import rfc8785

from agentflow_core.errors import CanonicalizationError

HASH_PREFIX = "sha256:"

# JCS serializes numbers as IEEE doubles; rfc8785 accepts |i| < 2**53 only.
_MAX_SAFE = 2**53
_ORJSON_OPTS = orjson.OPT_SORT_KEYS
# Deeper values take the reference path (orjson itself stops at 255 levels). The bound
# also guarantees the fast-path check terminates on self-referential containers.
_MAX_FAST_DEPTH = 64


def _fast_path_ok(value: Any, depth: int = 0) -> bool:
    """True when orjson's sorted output of ``value`` is exactly the JCS form.

    Containers nested deeper than ``_MAX_FAST_DEPTH`` are refused, which also makes the
    check terminate on self-referential containers (the reference then raises).
    """
    t = type(value)
    if t is dict:
        if depth >= _MAX_FAST_DEPTH:
            return False
        for k in value:
            if type(k) is not str or (k and max(k) >= "\U00010000"):
                return False
        items = value.values()
    elif t is list:
        if depth >= _MAX_FAST_DEPTH:
            return False
        items = value
    else:
        return _scalar_ok(value, t)
    for item in items:
        ti = type(item)
        if ti is dict or ti is list:
            if not _fast_path_ok(item, depth + 1):
                return False
        elif not _scalar_ok(item, ti):
            return False
    return True


def _scalar_ok(value: Any, t: type) -> bool:
    # Lone surrogates in a str: orjson raises and rfc8785 decides what to do.
    if t is str or t is bool or value is None:
        return True
    # float, tuple, subclasses and anything exotic: let the reference decide.
    return t is int and -_MAX_SAFE < value < _MAX_SAFE


def _canonicalize(value: Any) -> tuple[bytes, bool]:
    """(JCS bytes, whether the orjson fast path produced them)."""
    if _fast_path_ok(value):
        try:
            return orjson.dumps(value, option=_ORJSON_OPTS), True
        except orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: the reference gives the precise error
    try:
        return rfc8785.dumps(value), False
    except (
        rfc8785.CanonicalizationError,
        TypeError,
        ValueError,
        UnicodeError,
        # A self-referential container, or nesting deeper than the interpreter's stack.
        RecursionError,
    ) as exc:
        raise CanonicalizationError(f"value cannot be canonicalized per RFC 8785: {exc}") from exc


def canonicalize(value: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of ``value``.

    Raises :class:`CanonicalizationError` for values JCS cannot represent (NaN,
    Infinity, integers outside ±(2**53 - 1), non-string keys, lone surrogates) and for
    self-referential or too deeply nested containers (the reference recurses per level).
    """
    return _canonicalize(value)[0]


def canonicalize_portable(value: Any) -> bytes:
    """Like :func:`canonicalize`, but also refuses values whose canonical text does not
    parse back to the same canonical text.

    JCS writes a float such as ``1e16`` as the digits ``10000000000000000``, which any
    JSON parser reads back as an integer outside the JCS domain, so an envelope holding it
    could never be verified by its receiver. Everything AgentFlow hashes and sends goes
    through this check; it costs nothing on the fast path (no floats there).
    """
    out, fast = _canonicalize(value)
    if not fast:
        try:
            # The stdlib parser, like most, reads digit-only numbers as integers.
            again = _canonicalize(json.loads(out))[0]
        except (ValueError, CanonicalizationError) as exc:
            again = str(exc).encode()
        if again != out:
            raise CanonicalizationError(
                "value does not survive a JSON round trip in canonical form "
                "(e.g. a float of magnitude >= 2**53 with no fraction); send it as a string"
            )
    return out


def content_hash(value: Any) -> str:
    """``"sha256:" + hex(sha256(JCS(value)))``, for values that survive a round trip."""
    return HASH_PREFIX + hashlib.sha256(canonicalize_portable(value)).hexdigest()
