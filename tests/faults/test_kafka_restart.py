"""Scenario 2: the Kafka broker restarts under a running worker, first cleanly, then by kill -9.
The worker rides both out by itself (it is never restarted) and ends with every event exactly once."""

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

pytestmark = pytest.mark.timeout(1200 if SOAK else 420)


def test_kafka_broker_restarts_clean_then_kill_9(scenario, services, workers, history):
    history.install_audit()
    events = make_events(scaled(20_000))
    expected = expected_ids(events)
    worker = FaultWorker(scenario)
    workers.append(worker)
    worker.start()
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=600)
    faults = [("down", 0.25), ("kill", 0.6)] * (3 if SOAK else 1)
    notes = []
    for how, fraction in faults:
        wait_until(
            lambda f=fraction: (history.count() or 0) >= f * len(expected),
            300,
            f"{fraction:.0%} of the rows",
            [worker],
            interval=0.2,
        )
        before = history.count() or 0
        services(how, "kafka")
        down_at = time.monotonic()
        services("up", "kafka")
        up_at = time.monotonic()
        # New rows again: the worker reconnected to the restarted broker without help.
        at_return = history.count() or 0
        wait_until(
            lambda r=at_return: (history.count() or 0) > r,
            180,
            "new rows after the broker's return",
            [worker],
            interval=0.2,
        )
        notes.append(
            f"{how} at {before} rows: broker away {up_at - down_at:.1f}s, rows again after "
            f"{time.monotonic() - up_at:.1f}s"
        )
        assert worker.alive(), "the worker died with the broker"
    producer.join_checked()
    wait_drained(scenario, history, len(expected), workers=[worker])
    took = timer.elapsed()
    assert worker.alive()
    assert worker.starts == 1, "the worker must ride out the fault by itself"
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    counts = worker.lifetime()
    measure(
        f"scenario 2 (broker clean restart + kill -9): {len(expected)} events exactly once in {took:.0f}s; "
        f"{'; '.join(notes)}; producer re-sent {producer.resent}; skipped duplicates "
        f"table={counts['dup_table']:.0f} clickhouse={counts['dup_clickhouse']:.0f}"
    )
