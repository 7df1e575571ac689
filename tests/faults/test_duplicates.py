"""Scenario 5: every event published 10 times, the copies shuffled over the whole run (200,000
messages for 20,000 events), so duplicates meet every dedup layer: the same batch, the idempotency
table, and the per-batch ClickHouse lookup."""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    SOAK,
    FaultWorker,
    Timer,
    assert_audit_clean,
    assert_exactly_once,
    assert_no_dead_letters,
    expected_ids,
    interleave,
    make_events,
    measure,
    produce,
    scaled,
    wait_drained,
)

pytestmark = pytest.mark.timeout(1200 if SOAK else 420)

COPIES = 10


def test_every_event_published_ten_times_interleaved(scenario, workers, history):
    history.install_audit()
    events = make_events(scaled(20_000))
    expected = expected_ids(events)
    messages = interleave(events, COPIES)
    worker = FaultWorker(scenario)
    workers.append(worker)
    worker.start()
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, messages)
    producer.join_checked()
    produced_s = timer.elapsed()
    wait_drained(scenario, history, len(expected), workers=[worker], timeout=600)
    took = timer.elapsed()
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    counts = worker.lifetime()
    skipped = counts["dup_batch"] + counts["dup_table"] + counts["dup_clickhouse"]
    assert counts["consumed"] == len(messages) + producer.resent
    assert counts["inserted"] == len(expected)
    assert skipped == len(messages) - len(expected)
    measure(
        f"scenario 5 (each event x{COPIES}, interleaved): {len(messages)} messages produced in "
        f"{produced_s:.1f}s, {len(expected)} rows exactly once in {took:.0f}s "
        f"({len(messages) / took:.0f} msg/s); duplicates skipped in-batch={counts['dup_batch']:.0f}, "
        f"table={counts['dup_table']:.0f}, clickhouse={counts['dup_clickhouse']:.0f}"
    )
