"""The collector's cardinality bounds, without servers (the collector itself runs against
real JetStream and Postgres in tests/e2e/test_metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from agentflow_control_plane.metrics_collector import OTHER, QueueState, _Series, cap_labels


def test_names_past_the_cap_share_one_label_value() -> None:
    labels = cap_labels([f"q{i:03}" for i in range(250)] + ["q000"], 200)
    assert len(labels) == 250
    assert len(set(labels.values())) == 201
    assert labels["q000"] == "q000" and labels["q199"] == "q199" and labels["q200"] == OTHER


def test_merged_queues_add_depths_and_keep_the_oldest_age() -> None:
    total = QueueState()
    total.merge(QueueState(depth=3, ack_pending=1, redelivered=1, oldest_pending_s=5, oldest_unacked_s=9))
    total.merge(QueueState(depth=2, ack_pending=2, oldest_pending_s=7, oldest_unacked_s=8))
    assert total == QueueState(depth=5, ack_pending=3, redelivered=1, oldest_pending_s=7, oldest_unacked_s=9)


def test_series_that_vanish_are_removed_from_the_scrape() -> None:
    registry = CollectorRegistry()
    series = _Series(Gauge("probe", "test", ["worker"], registry=registry))
    series.replace({("a",): 1, ("b",): 2})
    series.replace({("b",): 3})
    text = generate_latest(registry).decode()
    assert 'probe{worker="b"} 3.0' in text
    assert 'worker="a"' not in text
