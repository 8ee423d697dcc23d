"""The audit chain's hashing and verification: pure, so anyone can re-check a chain.

An entry is the JSON object ``{tenant, seq, ts, actor, action, resource, data, prev_hash}``
and its hash is ``"sha256:" + hex(sha256(JCS(entry)))`` (RFC 8785). The first entry of a
tenant's chain has ``prev_hash == GENESIS_HASH``; every later one holds the hash of the
entry before it, so changing, removing or reordering any entry changes every hash after it.

Appending happens while the tenant's chain head is locked, so the work done there must be
small. :func:`prepare` canonicalizes everything but ``prev_hash`` and ``seq`` up front (JCS
of an object is its members in sorted key order, so the canonical bytes split into fixed
parts around those two values); :meth:`Prepared.link` then costs one SHA-256.
``tests/unit/test_audit_chain.py`` checks the split form against ``rfc8785.dumps`` of the
whole entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agentflow_core.canonical import HASH_PREFIX, canonicalize, canonicalize_portable, content_hash
from agentflow_core.errors import CanonicalizationError

#: ``prev_hash`` of every chain's first entry
GENESIS_HASH = HASH_PREFIX + "0" * 64

#: the hashed members, in JCS (sorted) order
ENTRY_KEYS = ("action", "actor", "data", "prev_hash", "resource", "seq", "tenant", "ts")


def format_ts(ts: datetime) -> str:
    """The hashed form of a timestamp: UTC, microseconds, ``Z`` (Postgres keeps microseconds,
    so a stored ``timestamptz`` gives back exactly this text)."""
    if ts.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_body(
    *,
    tenant: str,
    seq: int,
    ts: datetime | str,
    actor: str,
    action: str,
    resource: str,
    data: Any,
    prev_hash: str,
) -> dict[str, Any]:
    """The object an entry's hash is computed over."""
    return {
        "action": action,
        "actor": actor,
        "data": data,
        "prev_hash": prev_hash,
        "resource": resource,
        "seq": seq,
        "tenant": tenant,
        "ts": ts if isinstance(ts, str) else format_ts(ts),
    }


def entry_hash(body: Mapping[str, Any]) -> str:
    """Hash of an entry (``body`` as returned by :func:`entry_body`, ``hash`` excluded)."""
    return content_hash(dict(body))


@dataclass(frozen=True, slots=True)
class Prepared:
    """An entry canonicalized except for ``prev_hash`` and ``seq``."""

    tenant: str
    ts: datetime
    actor: str
    action: str
    resource: str
    data: Any
    _head: bytes
    _mid: bytes
    _tail: bytes

    def link(self, seq: int, prev_hash: str) -> str:
        """The entry's hash once it is placed at ``seq`` after ``prev_hash``."""
        return (
            HASH_PREFIX
            + hashlib.sha256(self._head + prev_hash.encode() + self._mid + str(seq).encode() + self._tail).hexdigest()
        )


def prepare(*, tenant: str, ts: datetime, actor: str, action: str, resource: str, data: Any) -> Prepared:
    """Canonicalize an entry ahead of the chain lock. Raises ``CanonicalizationError`` when
    ``data`` has no portable canonical form (e.g. NaN): such an entry is refused at once."""
    c = canonicalize
    data_bytes = canonicalize_portable(data)
    if b"\\u0000" in data_bytes or "\x00" in actor + resource:
        # Postgres text and jsonb cannot hold NUL: refuse here, not halfway through a commit.
        raise CanonicalizationError("audit entries cannot contain NUL characters")
    head = (
        b'{"action":' + c(action) + b',"actor":' + c(actor) + b',"data":' + data_bytes
        # prev_hash is always "sha256:<hex>": plain ASCII, nothing to escape
        + b',"prev_hash":"'
    )  # fmt: skip
    mid = b'","resource":' + c(resource) + b',"seq":'
    tail = b',"tenant":' + c(tenant) + b',"ts":' + c(format_ts(ts)) + b"}"
    return Prepared(tenant, ts, actor, action, resource, data, head, mid, tail)


@dataclass(frozen=True, slots=True)
class Linked:
    entry: Prepared
    seq: int
    prev_hash: str
    hash: str


def link_all(head_seq: int, head_hash: str, entries: Iterable[Prepared]) -> list[Linked]:
    """Place ``entries`` after a chain head (``0, GENESIS_HASH`` for an empty chain)."""
    out: list[Linked] = []
    seq, prev = head_seq, head_hash
    for entry in entries:
        seq += 1
        digest = entry.link(seq, prev)
        out.append(Linked(entry, seq, prev, digest))
        prev = digest
    return out


@dataclass(slots=True)
class ChainVerifier:
    """Checks a tenant's chain fed in ``seq`` order, one entry at a time (constant memory).

    Reports the first ``seq`` that is not what an untouched chain would hold there: a
    changed entry (its hash no longer matches its content), a removed entry (a gap: the
    missing seq is reported), a reordered or replaced one (its ``prev_hash`` is not the
    previous entry's hash).
    """

    tenant: str
    length: int = 0
    head_hash: str = GENESIS_HASH
    first_bad_seq: int | None = None
    problem: str | None = None
    #: anchors (seq -> hash) to compare against as the chain passes them
    anchors: dict[int, str] = field(default_factory=dict)
    anchors_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None

    def _bad(self, seq: int, problem: str) -> None:
        if self.first_bad_seq is None:
            self.first_bad_seq = seq
            self.problem = problem

    def feed(self, body: Mapping[str, Any], stored_hash: str) -> bool:
        """Check the next entry; returns False once the chain is known to be broken (the
        caller may stop reading)."""
        if not self.ok:
            return False
        expected_seq = self.length + 1
        seq = body.get("seq")
        if body.get("tenant") != self.tenant:
            self._bad(expected_seq, f"entry {seq} belongs to tenant {body.get('tenant')!r}")
            return False
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                self._bad(expected_seq, f"entry {expected_seq} is missing (next stored entry is {seq})")
            else:
                self._bad(expected_seq, f"entry {expected_seq} is out of order (found seq {seq})")
            return False
        if body.get("prev_hash") != self.head_hash:
            self._bad(seq, f"entry {seq} does not follow entry {seq - 1} (prev_hash differs)")
            return False
        try:
            actual = entry_hash(body)
        except ValueError as exc:  # CanonicalizationError and friends
            self._bad(seq, f"entry {seq} cannot be canonicalized: {exc}")
            return False
        if actual != stored_hash:
            self._bad(seq, f"entry {seq} was changed after it was written (hash mismatch)")
            return False
        anchored = self.anchors.get(seq)
        if anchored is not None:
            self.anchors_checked += 1
            if anchored != stored_hash:
                self._bad(seq, f"entry {seq} differs from its external anchor")
                return False
        self.length = seq
        self.head_hash = stored_hash
        return True

    def finish(self, *, expected_length: int | None = None) -> None:
        """Call after the last entry: an anchor or the recorded head past the end of the
        chain means entries were cut off."""
        beyond = [s for s in self.anchors if s > self.length]
        if expected_length is not None and expected_length > self.length:
            beyond.append(expected_length)
        if beyond and self.ok:
            self._bad(self.length + 1, f"the chain ends at {self.length}, but entry {max(beyond)} was recorded")
