"""Scenario 4: the ClickHouse server is killed (-9) while the worker's INSERT is in flight, then
started again, three times in a run.

A watcher polls system.processes every few milliseconds; when the worker starts writing a batch (its
per-batch lookup, then the INSERT into the history table) the test kills the server. The watcher's
last answer before the server died says whether the INSERT was still running: if so it may have
landed in full, in part (one block per partition) or not at all, and the worker did not hear which.
The sink retries the batch; on 18.16 (no insert_deduplication_token) the retry first looks up which
rows landed (app/history.py), and a redelivered batch meets the per-batch lookup (app/sink.py).
"""

from __future__ import annotations

import threading
import time

import pytest
from clickhouse_driver import Client

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


class SinkWatcher(threading.Thread):
    """Polls the worker's queries on the history table until the server stops answering."""

    def __init__(self, scenario) -> None:
        super().__init__(daemon=True)
        settings = scenario.settings()
        self.table = settings.history_table
        target = settings.clickhouse
        self.client = Client(host=target.host, port=target.port, user=target.user, connect_timeout=2)
        self.seen = threading.Event()
        self.last: tuple[set[str], int] = (set(), -1)
        self.stopping = False

    def poll(self) -> tuple[set[str], int]:
        # Starts with WITH, so this query (which names the table too) never matches itself.
        rows = self.client.execute(
            f"WITH (SELECT count() FROM `{self.table}`) AS total "
            "SELECT startsWith(query, 'INSERT INTO') AS is_insert, any(total) FROM system.processes "
            "WHERE (startsWith(query, 'INSERT INTO') OR startsWith(query, 'SELECT DISTINCT entity_id')) "
            f"AND position(query, '`{self.table}`') > 0 GROUP BY is_insert"
        )
        return {"insert" if is_insert else "lookup" for is_insert, _ in rows}, (
            int(rows[0][1]) if rows else -1
        )

    def run(self) -> None:
        try:
            while not self.stopping:
                self.last = self.poll()
                if self.last[0]:
                    self.seen.set()
                time.sleep(0.002)
        except Exception:
            pass  # the server is gone: self.last is its last answer
        finally:
            self.client.disconnect()


def test_clickhouse_killed_while_an_insert_is_in_flight(scenario, services, workers, history):
    history.install_audit()
    # 8 KB documents, 4 s batches and timestamps over 36 months (each INSERT writes one part per data
    # type and month: ~100 parts), so an INSERT runs ~0.3 s, long enough to be killed in flight by
    # `scripts/stack kill` (~0.2 s from decision to SIGKILL), and parts land one by one (partial
    # inserts are possible).
    events = make_events(scaled(20_000), pad=8192, months=36)
    expected = expected_ids(events)
    worker = FaultWorker(scenario, SINK_BATCH_WITHIN_SECONDS="4")
    workers.append(worker)
    worker.start()
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=800)
    marks = [0.1 * k for k in range(1, 10)] if SOAK else [0.15, 0.4, 0.65]
    # Kill timing is a race against the INSERT (~0.3 s): should every planned kill miss it, a few
    # more are made later in the run, so that the run always proves the in-flight case.
    spare = [0.75, 0.85, 0.92]
    interrupted = 0
    notes = []
    for fraction in marks + spare:
        if fraction in spare and interrupted:
            break
        wait_until(
            lambda f=fraction: (history.count() or 0) >= f * len(expected),
            300,
            f"{fraction:.0%} of the rows",
            [worker],
            interval=0.2,
        )
        watcher = SinkWatcher(scenario)
        watcher.start()
        seen = watcher.seen.wait(30)
        first = set(watcher.last[0])
        services("kill", "clickhouse")
        watcher.join(10)
        watcher.stopping = True
        kinds, rows_then = watcher.last
        services("up", "clickhouse")
        hit = "insert" in kinds
        interrupted += hit
        notes.append(
            f"{'INSERT in flight' if hit else ('lookup in flight' if kinds else 'between queries')} "
            f"(triggered on {sorted(first) if seen else 'nothing'}, {rows_then} rows)"
        )
        wait_until(lambda: worker.get("/stats") and history.count(), 60, "ClickHouse back", [worker])
    producer.join_checked()
    wait_drained(scenario, history, len(expected), workers=[worker])
    took = timer.elapsed()
    assert worker.alive()
    assert worker.starts == 1, "the worker must ride out the fault by itself"
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected, exact=False)
    assert_no_dead_letters(scenario)
    retried = [
        line.split("retried insert", 1)[1] for line in worker.log().splitlines() if "retried insert" in line
    ]
    counts = worker.lifetime()
    measure(
        f"scenario 4 (ClickHouse kill -9 x{len(notes)}, {interrupted} while an INSERT was in flight): "
        f"{len(expected)} events exactly once in {took:.0f}s; kills: {'; '.join(notes)}; "
        f"retried inserts that found rows already written: {retried or 'none'}; skipped by the lookup: "
        f"{counts['dup_clickhouse']:.0f}"
    )
    assert interrupted >= 1, f"no kill interrupted an INSERT: {notes}"
