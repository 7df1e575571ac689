"""Scenario 1: kill -9 of the worker at about 20 %, 50 % and 80 % of the run, restarted each time:
on the same data dir (a pod restarted on its volume), except after the second kill, where the data
dir is wiped (a pod rescheduled without its volume: the idempotency table comes back from its
changelog only, without the marks not yet sent). Nothing lost, nothing doubled.

Each kill comes right after the row count crossed the mark, i.e. right after an insert landed: the
window between the ClickHouse insert and the table mark / offset commit, where a redelivery happens.
"""

from __future__ import annotations

import shutil

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


def test_kill_9_of_the_worker_three_times(scenario, workers, history):
    history.install_audit()
    events = make_events(scaled(20_000))
    expected = expected_ids(events)
    # A killed member leaves the group only when its session times out; until then the restarted
    # worker's join waits (Faust's default broker_session_timeout is 60 s). CI shortens that wait;
    # soak mode keeps the default and so measures the real stall.
    env = {} if SOAK else {"BROKER_SESSION_TIMEOUT": "10"}
    worker = FaultWorker(scenario, **env)
    workers.append(worker)
    worker.start()
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=600)
    marks = [0.1 * k for k in range(1, 10)] if SOAK else [0.2, 0.5, 0.8]
    kills = []
    for fraction in marks:
        wait_until(
            lambda f=fraction: (history.count() or 0) >= f * len(expected),
            300,
            f"{fraction:.0%} of the rows",
            [worker],
            interval=0.1,
        )
        rows = history.count()
        worker.kill()
        wiped = len(kills) % 3 == 1
        if wiped:
            shutil.rmtree(worker.data_dir)
        back_after = worker.restart()
        kills.append(f"{rows} rows -> back{' on an empty data dir' if wiped else ''} in {back_after:.1f}s")
    producer.join_checked()
    wait_drained(scenario, history, len(expected), workers=[worker])
    took = timer.elapsed()
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    counts = worker.lifetime()
    measure(
        f"scenario 1 (kill -9 x{len(marks)}): {len(expected)} events exactly once in {took:.0f}s; "
        f"kills at {'; '.join(kills)}; redelivered and skipped: table={counts['dup_table']:.0f}, "
        f"clickhouse lookup={counts['dup_clickhouse']:.0f}, in-batch={counts['dup_batch']:.0f}"
    )
