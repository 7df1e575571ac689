"""Scenario 6: a second and a third worker join mid-run (rebalances: partitions and their table state
move), then one of them leaves (clean stop, one more rebalance). Nothing lost, nothing doubled."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import (
    SOAK,
    FaultWorker,
    Timer,
    assert_audit_clean,
    assert_exactly_once,
    assert_no_dead_letters,
    expected_ids,
    make_events,
    measure,
    produce,
    scaled,
    wait_drained,
    wait_until,
)
from tests.worker import Scenario

pytestmark = pytest.mark.timeout(1200 if SOAK else 420)


@pytest.fixture
def scenario(stack, unique_name, tmp_path) -> Scenario:
    # Six partitions, so three workers each get some.
    return Scenario(stack, unique_name, tmp_path, partitions=6)


def test_workers_join_and_leave_mid_run(scenario, workers, history):
    history.install_audit()
    events = make_events(scaled(20_000))
    expected = expected_ids(events)
    first = FaultWorker(scenario, "w1")
    workers.append(first)
    first.start()
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=500)
    steps = [(0.2, "join", "w2"), (0.45, "join", "w3"), (0.7, "leave", "w2")]
    if SOAK:
        steps += [(0.8, "join", "w4"), (0.9, "leave", "w1")]
    by_label = {"w1": first}
    notes = []
    for fraction, action, label in steps:
        wait_until(
            lambda f=fraction: (history.count() or 0) >= f * len(expected),
            300,
            f"{fraction:.0%} of the rows",
            list(by_label.values()),
            interval=0.2,
        )
        rows = history.count()
        if action == "join":
            worker = FaultWorker(scenario, label)
            workers.append(worker)
            by_label[label] = worker
            took = worker.restart()
        else:
            worker = by_label[label]
            step = Timer()
            worker.stop()
            took = step.elapsed()
        notes.append(f"{label} {action}s at {rows} rows ({took:.1f}s)")
    producer.join_checked()
    live = [w for w in by_label.values() if w.alive()]
    wait_drained(scenario, history, len(expected), workers=live)
    took = timer.elapsed()
    assert len(live) == len(by_label) - sum(1 for _, action, _ in steps if action == "leave")
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    counts = [w.lifetime() for w in by_label.values()]
    inserted = ", ".join(f"{label}={c['inserted']:.0f}" for label, c in zip(by_label, counts, strict=True))
    measure(
        f"scenario 6 (rebalance: {'; '.join(notes)}): {len(expected)} events exactly once in {took:.0f}s; "
        f"rows written per worker {inserted}; redeliveries skipped "
        f"table={sum(c['dup_table'] for c in counts):.0f} "
        f"clickhouse={sum(c['dup_clickhouse'] for c in counts):.0f}"
    )


def test_worker_joins_while_clickhouse_is_down(scenario, services, workers, history):
    """A rebalance while the first worker holds a batch it cannot write: Faust does not wait for
    in-flight events on revocation (stream_wait_empty=False), so the held batch and the new owner's
    re-read of the same offsets both reach ClickHouse once it returns. The per-batch lookup (and on
    18.16 the retried insert's own lookup) must keep them from writing a row twice."""
    history.install_audit()
    events = make_events(scaled(20_000))
    expected = expected_ids(events)
    # Short backoff: both workers retry within the same second once ClickHouse is back, the closest
    # race between the two writers of a partition.
    first = FaultWorker(scenario, "w1", SINK_BACKOFF_MAX_SECONDS="1")
    workers.append(first)
    first.start()
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=800)
    wait_until(lambda: (history.count() or 0) >= 0.2 * len(expected), 120, "20% of the rows", [first])
    services("down", "clickhouse")
    wait_until(lambda: first.metric("memory_sync_sink_waiting") == 1, 60, "w1 holding a batch", [first])
    second = FaultWorker(scenario, "w2", SINK_BACKOFF_MAX_SECONDS="1")
    workers.append(second)
    second.start()
    wait_until(lambda: second.metric("memory_sync_sink_waiting") == 1, 60, "w2 holding a batch", [second])
    services("up", "clickhouse")
    back_at = time.monotonic()
    producer.join_checked()
    drained_at = wait_drained(scenario, history, len(expected), workers=[first, second])
    took = timer.elapsed()
    assert first.alive()
    assert second.alive()
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    # w1's held batch was taken before w2 joined: it must have been dropped, not written.
    dropped = first.metric("memory_sync_stale_batches_dropped_total")
    assert dropped >= 1, "w1's batch from before the rebalance was not fenced off"
    counts = [first.lifetime(), second.lifetime()]
    measure(
        f"scenario 6b (w2 joins while ClickHouse is down and w1 holds a batch): {len(expected)} events "
        f"exactly once in {took:.0f}s (drained {drained_at - back_at:.0f}s after ClickHouse returned); "
        f"rows written w1={counts[0]['inserted']:.0f} w2={counts[1]['inserted']:.0f}; "
        f"stale batches dropped w1={dropped:.0f}; found already written by the lookup "
        f"w1={counts[0]['dup_clickhouse']:.0f} w2={counts[1]['dup_clickhouse']:.0f}"
    )
