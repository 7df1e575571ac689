"""Scenario 3: the ClickHouse server is stopped for two minutes mid-run, then started again.

A sink-level outage: the worker holds its batch and retries (capped, jittered backoff), stays alive,
says so on /stats (sink "waiting") and /readyz (503), sends nothing to the DLQ, and catches up by
itself once the server is back: the group's lag is 0 within 60 s of the server's return.

Holding a batch must not cost the worker its group membership: Faust keeps polling while the agent
waits. The worker runs with max.poll.interval at 30 s, a quarter of the outage (the default is
1000 s), and must not rejoin the group once.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.timeout(1200 if SOAK else 480)

OUTAGE_S = 600.0 if SOAK else 120.0
RECOVERY_LIMIT_S = 60.0


def sink_state(worker: FaultWorker) -> dict:
    body = worker.get("/stats")
    return json.loads(body)["sink"] if body else {}


def test_clickhouse_down_for_two_minutes(scenario, services, workers, history):
    history.install_audit()
    events = make_events(scaled(20_000))
    expected = expected_ids(events)
    worker = FaultWorker(scenario, BROKER_MAX_POLL_INTERVAL="30")
    workers.append(worker)
    worker.start()
    timer = Timer()
    # Production spans the outage and ends before the server returns, so "lag 0" after the return
    # measures the catch-up of a fixed backlog.
    rate = len(events) / (15 + OUTAGE_S - 10)
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=rate)
    wait_until(lambda: (history.count() or 0) >= 0.08 * len(expected), 120, "the first rows", [worker])
    rows_before = history.count()
    services("down", "clickhouse")
    down_at = time.monotonic()

    # While the server is away: the sink says it waits, readiness fails, the worker lives, no DLQ.
    state = wait_until(
        lambda: (s := sink_state(worker)).get("state") == "waiting" and s,
        60,
        "sink state 'waiting'",
        [worker],
    )
    assert state["reason"], state
    status, body = worker.get_status("/readyz")
    assert status == 503, body
    assert "clickhouse" in json.loads(body)["problems"], body
    assert worker.metric("memory_sync_sink_waiting") == 1
    while time.monotonic() - down_at < OUTAGE_S:
        assert worker.alive(), "the worker died while ClickHouse was down"
        assert worker.metric("memory_sync_dlq_events_total") == 0
        assert worker.metric("memory_sync_retries_scheduled_total") == 0
        time.sleep(5)
    waiting = sink_state(worker)
    assert waiting["state"] == "waiting", waiting
    producer.join_checked(timeout=60)

    services("up", "clickhouse")
    back_at = time.monotonic()
    drained_at = wait_drained(scenario, history, len(expected), workers=[worker], timeout=240)
    recovery_s = drained_at - back_at
    took = timer.elapsed()

    assert worker.alive()
    assert worker.starts == 1, "the worker must ride out the outage by itself"
    assert worker.log().count("Joined group") == 1, "the worker lost its group membership"
    assert recovery_s <= RECOVERY_LIMIT_S, f"lag back to 0 only {recovery_s:.1f}s after ClickHouse returned"
    assert sink_state(worker)["state"] == "healthy"
    assert worker.get_status("/readyz")[0] == 200
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    measure(
        f"scenario 3 (ClickHouse down {OUTAGE_S:.0f}s at {rows_before} rows): {len(expected)} events exactly "
        f"once in {took:.0f}s; lag 0 {recovery_s:.1f}s after the server's return (limit "
        f"{RECOVERY_LIMIT_S:.0f}s); {waiting['attempts']} sink retries while down; "
        "0 DLQ; worker never restarted, never left the group (max.poll.interval 30s)"
    )
