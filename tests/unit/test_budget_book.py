"""The budget book's arithmetic, without a database: windows, reservations, settlement."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agentflow_control_plane.governance.budgets import Budget, BudgetBook, Window, usd, window_key

NOW = datetime(2026, 11, 21, 23, 59, 59, tzinfo=UTC)
RUN = uuid.UUID(int=1)


def _budget(name: str, scope: str = "tenant", target: str = "", period: str = "day", **kw: Any) -> Budget:
    return Budget(name, scope, target, period, kw.get("limit_usd"), kw.get("limit_tokens"), kw.get("enf", "hard"))


def _book(*budgets: Budget, spent: Decimal = Decimal(0)) -> BudgetBook:
    windows = {("t", b.name, b.window(RUN, NOW)): Window(b, b.window(RUN, NOW), spent_usd=spent) for b in budgets}
    return BudgetBook({"t": budgets}, windows, {}, NOW)


def test_windows_are_the_run_the_utc_day_or_the_utc_month() -> None:
    assert window_key("run", RUN, NOW) == str(RUN)
    assert window_key("day", RUN, NOW) == "2026-11-21"
    assert window_key("month", RUN, NOW) == "2026-11"
    assert window_key("day", RUN, datetime.fromisoformat("2026-11-22T00:30:00+01:00")) == "2026-11-21"


def test_scopes_cover_what_they_name() -> None:
    assert _budget("a", "workflow", "wf").covers("wf", None) and not _budget("a", "workflow", "wf").covers("x", "a")
    agent = _budget("a", "agent", "writer")
    assert agent.covers("any", "writer") and not agent.covers("any", "reader") and not agent.covers("any", None)
    assert _budget("a", "run", period="run").covers("any", None)


def test_a_reservation_fits_until_the_limit_and_not_a_cent_beyond() -> None:
    book = _book(_budget("pot", limit_usd=Decimal("1.00")))
    step = uuid.uuid4()
    assert book.reserve([(step, 1, "a", usd(0.6), 10)], tenant="t", run_id=RUN, workflow="wf") is None
    refusal = book.reserve([(uuid.uuid4(), 1, "a", usd(0.41), 10)], tenant="t", run_id=RUN, workflow="wf")
    assert refusal is not None and refusal.limit == "usd"
    numbers = refusal.as_dict()
    assert (numbers["remaining_usd"], numbers["requested_usd"]) == ("0.40", "0.41")
    assert "needs $0.41, $0.40 of $1.00 remain" in refusal.message()
    assert book.reserve([(uuid.uuid4(), 1, "a", usd(0.4), 10)], tenant="t", run_id=RUN, workflow="wf") is None


def test_reserving_several_steps_is_all_or_nothing() -> None:
    book = _book(_budget("pot", limit_usd=Decimal("1.00")), _budget("tokens", limit_tokens=100))
    items = [(uuid.uuid4(), 1, "a", usd(0.3), 40), (uuid.uuid4(), 1, "b", usd(0.3), 70)]
    refusal = book.reserve(items, tenant="t", run_id=RUN, workflow="wf")
    assert refusal is not None and refusal.budget.name == "tokens" and refusal.limit == "tokens"
    assert book.new_reservations == []
    assert all(w.reserved_usd == 0 and w.reserved_tokens == 0 for w in book.windows.values())


def test_soft_budgets_never_refuse_and_free_steps_reserve_nothing() -> None:
    book = _book(_budget("soft", limit_usd=Decimal("0.01"), enf="soft"))
    assert book.reserve([(uuid.uuid4(), 1, "a", usd(5), 10)], tenant="t", run_id=RUN, workflow="wf") is None
    hard = _book(_budget("pot", limit_usd=Decimal("1")), spent=Decimal("2"))
    assert hard.reserve([(uuid.uuid4(), 1, "echo", Decimal(0), 0)], tenant="t", run_id=RUN, workflow="wf") is None
    assert book.new_reservations == [] and hard.new_reservations == []


def test_settling_releases_the_reservation_and_counts_the_spend_once_with_one_warning() -> None:
    audits: list[tuple[str, str, str, dict[str, Any]]] = []
    soft = _budget("soft", limit_usd=Decimal("0.50"), enf="soft")
    book = _book(_budget("pot", limit_usd=Decimal("1.00")), soft)
    book.audit = lambda *entry: audits.append(entry)
    step = uuid.uuid4()
    book.reserve([(step, 1, "a", usd(0.8), 0)], tenant="t", run_id=RUN, workflow="wf")
    book.held[(step, 1)] = list(book.new_reservations)  # as a later transaction loads them
    for attempt_spend in (Decimal("0.3"), Decimal("0.3")):
        book.settle(tenant="t", run_id=RUN, workflow="wf", agent="a", step_id=step, attempt=1,
                    spent_usd=attempt_spend, spent_tokens=5)  # fmt: skip
    pot, soft_window = (book.windows[("t", n, "2026-11-21")] for n in ("pot", "soft"))
    assert pot.reserved_usd == 0 and pot.spent_usd == Decimal("0.6") and soft_window.spent_usd == Decimal("0.6")
    assert [a[1] for a in audits] == ["budget.warning"] and audits[0][3]["spent_usd"] == "0.60"
    assert book.released == [(step, 1)] and book.retry_amount(step, 1) == (usd(0.8), 0)


def test_a_finished_run_gives_back_what_its_steps_hold() -> None:
    book = _book(_budget("pot", limit_usd=Decimal("1.00")))
    other_run = uuid.UUID(int=2)
    book.reserve([(uuid.uuid4(), 1, "a", usd(0.5), 0)], tenant="t", run_id=RUN, workflow="wf")
    book.release_run(RUN)
    assert book.new_reservations == [] and book.windows[("t", "pot", "2026-11-21")].reserved_usd == 0
    assert book.reserve([(uuid.uuid4(), 1, "a", usd(1), 0)], tenant="t", run_id=other_run, workflow="wf") is None
