"""The audit chain's pure core: the split canonical form, linking, streaming verification."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from agentflow_core.audit import GENESIS_HASH, ChainVerifier, entry_body, entry_hash, format_ts, link_all, prepare
from agentflow_core.errors import CanonicalizationError

T0 = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)

json_leaf = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20)
json_data = st.dictionaries(
    st.text(max_size=8), st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3), max_leaves=6), max_size=4
)
plain_text = st.text(max_size=30).filter(lambda s: "\x00" not in s)


@settings(max_examples=300, deadline=None)
@given(action=plain_text, actor=plain_text, resource=plain_text, tenant=plain_text, data=json_data,
       seq=st.integers(1, 2**40), micros=st.integers(0, 10**12))  # fmt: skip
def test_split_form_hashes_exactly_like_rfc8785_of_the_whole_entry(
    action: str, actor: str, resource: str, tenant: str, data: dict[str, Any], seq: int, micros: int
) -> None:
    if "\\u0000" in rfc8785.dumps(data).decode():
        return  # refused on purpose (see the NUL test)
    ts = T0 + timedelta(microseconds=micros)
    prev = "sha256:" + hashlib.sha256(str(seq).encode()).hexdigest()
    prepared = prepare(tenant=tenant, ts=ts, actor=actor, action=action, resource=resource, data=data)
    whole = entry_body(tenant=tenant, seq=seq, ts=ts, actor=actor, action=action, resource=resource, data=data,
                       prev_hash=prev)  # fmt: skip
    expected = "sha256:" + hashlib.sha256(rfc8785.dumps(whole)).hexdigest()
    assert prepared.link(seq, prev) == expected == entry_hash(whole)


def test_timestamps_are_utc_microseconds_with_z() -> None:
    assert format_ts(T0) == "2026-11-21T12:00:00.123456Z"
    from zoneinfo import ZoneInfo

    assert format_ts(T0.astimezone(ZoneInfo("Asia/Tokyo"))) == "2026-11-21T12:00:00.123456Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_ts(datetime(2026, 1, 1))


def test_nul_and_floats_that_cannot_round_trip_are_refused_up_front() -> None:
    with pytest.raises(CanonicalizationError, match="NUL"):
        prepare(tenant="t", ts=T0, actor="a", action="x", resource="r", data={"e": "a\x00b"})
    with pytest.raises(CanonicalizationError):
        prepare(tenant="t", ts=T0, actor="a", action="x", resource="r", data={"n": float("nan")})


def _chain(n: int, tenant: str = "acme") -> list[tuple[dict[str, Any], str]]:
    prepared = [
        prepare(
            tenant=tenant,
            ts=T0 + timedelta(seconds=i),
            actor="user:u",
            action="run.created",
            resource=f"run:{i}",
            data={"run": str(i), "n": i},
        )
        for i in range(n)
    ]
    out = []
    for link in link_all(0, GENESIS_HASH, prepared):
        e = link.entry
        body = entry_body(tenant=e.tenant, seq=link.seq, ts=e.ts, actor=e.actor, action=e.action,
                          resource=e.resource, data=e.data, prev_hash=link.prev_hash)  # fmt: skip
        out.append((body, link.hash))
    return out


def _verify(entries: list[tuple[dict[str, Any], str]], **kwargs: Any) -> ChainVerifier:
    v = ChainVerifier("acme", anchors=kwargs.pop("anchors", {}))
    for body, digest in entries:
        if not v.feed(body, digest):
            break
    v.finish(**kwargs)
    return v


def test_an_untouched_chain_verifies() -> None:
    chain = _chain(10)
    v = _verify(chain, expected_length=10)
    assert v.ok and v.length == 10 and v.head_hash == chain[-1][1]
    assert chain[0][0]["prev_hash"] == GENESIS_HASH


def test_a_changed_entry_is_named() -> None:
    chain = _chain(10)
    chain[6][0]["data"] = {"run": "6", "n": 666}
    v = _verify(chain)
    assert (v.ok, v.first_bad_seq) == (False, 7) and "hash mismatch" in (v.problem or "")


def test_a_removed_entry_is_named() -> None:
    chain = _chain(10)
    del chain[3]
    v = _verify(chain)
    assert v.first_bad_seq == 4 and "missing" in (v.problem or "")


def test_swapped_entries_are_named() -> None:
    chain = _chain(10)
    a, b = chain[2], chain[5]
    chain[2] = ({**b[0], "seq": 3}, b[1])
    chain[5] = ({**a[0], "seq": 6}, a[1])
    assert _verify(chain).first_bad_seq == 3


def test_a_cut_tail_is_found_against_the_head_or_an_anchor() -> None:
    chain = _chain(10)
    assert _verify(chain[:8], expected_length=10).first_bad_seq == 9
    assert _verify(chain[:8], anchors={10: chain[9][1]}).first_bad_seq == 9
    assert _verify(chain[:8]).ok  # with neither, a shorter chain is self-consistent


def test_anchors_are_compared_as_the_chain_passes_them() -> None:
    chain = _chain(10)
    v = _verify(chain, anchors={4: chain[3][1], 9: chain[8][1]})
    assert v.ok and v.anchors_checked == 2
    v = _verify(chain, anchors={4: "sha256:" + "f" * 64})
    assert v.first_bad_seq == 4 and "anchor" in (v.problem or "")


def test_an_entry_of_another_tenant_is_refused() -> None:
    chain = _chain(3)
    chain[1][0]["tenant"] = "other"
    assert _verify(chain).first_bad_seq == 2
