"""The counters the sink and the failure lane move, by how much, with the in-memory stand-ins of
tests/unit/test_sink.py (no Kafka, no ClickHouse)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from app import metrics, settings
from app.deadletter import H_ATTEMPTS, DeadLetters
from app.identity import event_id_for
from app.sink import Failure
from tests.unit.test_sink import FakeIndex, make_event, make_sink

ROOT = Path(__file__).resolve().parents[2]
SYNC = "memory.sync.events"  # make_sink's topic


def value(name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def snapshot() -> dict[str, float]:
    return {
        "consumed": value("memory_sync_events_consumed_total"),
        "consumed_sync": value("memory_sync_events_consumed_by_topic_total", topic=SYNC),
        "consumed_retry": value("memory_sync_events_consumed_by_topic_total", topic=settings.retry_topic),
        "dup_batch": value("memory_sync_duplicate_events_skipped_total", layer="batch"),
        "dup_table": value("memory_sync_duplicate_events_skipped_total", layer="table"),
        "dup_clickhouse": value("memory_sync_duplicate_events_skipped_total", layer="clickhouse"),
        "rows": value("memory_sync_rows_inserted_total", source="realtime"),
    }


def moved(before: dict[str, float]) -> dict[str, float]:
    after = snapshot()
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def test_handle_counts_consumed_and_each_duplicate_layer():
    index = FakeIndex(ids={event_id_for("contexts", f"e{i}", 1) for i in (20, 21, 22)})
    sink = make_sink(index=index)
    batch = (
        [make_event(i) for i in range(10)]
        + [make_event(0), make_event(1)]  # repeated inside the batch
        + [make_event(i) for i in (20, 21, 22)]  # already in the idempotency table
        + [make_event(99, payload=b"junk")]  # poison: consumed, routed, not a duplicate
    )
    before = snapshot()
    report = asyncio.run(sink.handle(batch))
    assert report.written == 10
    assert moved(before) == {
        "consumed": 16,
        "consumed_sync": 16,
        "dup_batch": 2,
        "dup_table": 3,
        "rows": 10,
    }


def test_a_retry_topic_batch_is_not_counted_in_the_seed_consumed_counter():
    """HighDLQRate divides dead letters by events consumed from the sync topic: a retried record
    passes through the retry topic up to three times but reaches the DLQ at most once."""
    sink = make_sink()
    asyncio.run(sink.handle([make_event(1)]))
    before = snapshot()
    asyncio.run(sink.handle([make_event(1), make_event(2)], topic=settings.retry_topic))
    assert moved(before) == {"consumed_retry": 2, "dup_table": 1, "rows": 1}
    before = snapshot()
    asyncio.run(sink.handle([make_event(3)], topic=SYNC))  # the sync topic named explicitly
    assert moved(before) == {"consumed": 1, "consumed_sync": 1, "rows": 1}


class FakeTopic:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, **kwargs: Any) -> Any:
        self.sent.append(kwargs)
        return asyncio.sleep(0)  # what the caller awaits for the broker's acknowledgement


def test_dead_letters_count_once_in_total_and_by_class_and_retries_count_neither():
    retry, dlq = FakeTopic(), FakeTopic()
    lane = DeadLetters(retry, dlq, "w-test")  # type: ignore[arg-type]
    exhausted = make_event(2, headers=[(H_ATTEMPTS, b"3")])  # its 4th failure: out of retries
    failures = [
        Failure(make_event(1, payload=b"junk"), "undecodable", "bad bytes", retryable=False),
        Failure(exhausted, "rejected_by_clickhouse", "Cannot parse input", retryable=True),
        Failure(make_event(3), "invalid_data", "not JSON", retryable=True),  # first failure: retried
    ]
    total = value("memory_sync_dlq_events_total")
    by_class = {
        c: value("memory_sync_dlq_events_by_class_total", error_class=c) for c in metrics.DLQ_ERROR_CLASSES
    }
    asyncio.run(lane.route(failures))
    assert len(dlq.sent) == 2
    assert len(retry.sent) == 1
    assert value("memory_sync_dlq_events_total") - total == 2
    assert {
        c: value("memory_sync_dlq_events_by_class_total", error_class=c) - before
        for c, before in by_class.items()
    } == {"undecodable": 1, "rejected_by_clickhouse": 1, "invalid_data": 0, "too_large": 0}


def test_every_error_class_the_code_sets_is_exported_from_the_start():
    """The by-class counter starts at 0 for each class (so rate() sees the first dead letter), and
    the promtool tests use these classes only (tests/unit/test_alert_rules.py)."""
    set_in_code = set()
    for path in [*ROOT.joinpath("app").glob("*.py"), *ROOT.joinpath("agents").glob("*.py")]:
        set_in_code |= set(re.findall(r"\bFailure\(\s*[^,()]+(?:\[[^]]*\])?,\s*\"(\w+)\"", path.read_text()))
    assert set_in_code == set(metrics.DLQ_ERROR_CLASSES)
    for error_class in metrics.DLQ_ERROR_CLASSES:
        assert (
            metrics.registry.get_sample_value(
                "memory_sync_dlq_events_by_class_total", {"error_class": error_class}
            )
            is not None
        )


def test_the_seed_dlq_rate_counters_have_no_labels():
    for counter in (metrics.events_consumed, metrics.dlq_events):
        (family,) = counter.collect()
        assert {
            sample.name: sample.labels for sample in family.samples if sample.name.endswith("_total")
        } == {family.name + "_total": {}}


def test_stats_page_shows_every_count():
    from app.web import render_stats_page

    data = {
        "worker_id": "w1",
        "sink": {"state": "healthy", "reason": ""},
        "counts": {
            "consumed": 1100,
            "consumed_by_topic": {SYNC: 1100, settings.retry_topic: 4},
            "duplicates_skipped": 100,
            "duplicates_by_layer": {"table": 100},
            "dlq": 1,
            "dlq_by_class": {"undecodable": 1},
            "rows_inserted": 1000,
        },
        "lag": {SYNC: {0: 0, 1: 3}},
        "lag_refreshed_at": 1_700_000_000.0,
        "idempotency_table": {
            0: {
                "role": "active",
                "entries": 600,
                "expired_entries": 0,
                "oldest_ms": 1_700_000_000_000,
                "newest_ms": 1_700_000_060_000,
                "scanned_at_ms": 1_700_000_100_000,
                "marked_by_this_worker": 0,
            }
        },
        "dlq": {"total": 0, "by_error_class": {}, "latest": []},
        "jobs": {},
        "runs": {"recent": [], "error": None},
    }
    page = render_stats_page(data)
    for row in (
        "<td>consumed</td><td>1100</td>",
        f"<td>consumed_by_topic[{settings.retry_topic}]</td><td>4</td>",
        "<td>duplicates_skipped</td><td>100</td>",
        "<td>duplicates_by_layer[table]</td><td>100</td>",
        "<td>dlq</td><td>1</td>",
        "<td>dlq_by_class[undecodable]</td><td>1</td>",
        "<td>rows_inserted</td><td>1000</td>",
        "<td>0</td><td>active</td><td>600</td><td>0</td><td>2023-11-14 22:13:20 UTC</td>",
        "refreshed 2023-11-14 22:13:20 UTC",
    ):
        assert row in page, row
