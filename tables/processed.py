"""The idempotency table: event ids already written to ClickHouse, per partition of the sync topic.

RocksDB-backed and changelog-backed, so it survives restarts and rebalances. The value is the time
(epoch ms) the id was first written. Growth is bounded by IDEMPOTENCY_HORIZON_HOURS (default 7 days,
the DLQ's retention, so a replayed DLQ record is still recognised): RocksDB's TTL drops older keys at
compaction, the changelog is `compact,delete` with the same retention so a recovery onto a new disk
does not bring them back, and `known()` ignores entries older than the horizon so behaviour does not
depend on when compaction ran. Windowed tables are not used: their expiry state is rebuilt only on
set, not on recovery (faust-streaming #385).

Faust routes table reads and writes to the *current event's* partition. A batch from `noack_take` has
no single current event, so every access here names its event explicitly.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from faust.streams import _current_event
from faust.types import EventT

from app import app, settings
from app.topics import sync_events

HORIZON_MS = settings.idempotency_horizon_hours * 3600 * 1000

processed_ids = app.Table(
    "processed-event-ids",
    key_type=str,
    value_type=int,
    partitions=settings.topic_partitions,
    help="event_id -> epoch ms when first written to ClickHouse",
    options={
        "ttl": settings.idempotency_horizon_hours * 3600,
        # RocksDB's defaults are sized for big hosts (2 GiB block cache per partition DB).
        "block_cache_size": 32 * 1024 * 1024,
        "write_buffer_size": 16 * 1024 * 1024,
        "max_write_buffer_number": 2,
    },
    extra_topic_configs={
        "cleanup.policy": "compact,delete",
        "retention.ms": str(HORIZON_MS),
    },
)

# Counters kept here rather than len(table), which scans every key.
stats: dict[int, dict[str, int]] = {}


def partition_stats() -> dict[int, dict[str, int | None]]:
    """Per partition: RocksDB's key estimate, and the first/last marks this worker made."""
    result: dict[int, dict[str, int | None]] = {}
    store = processed_ids.data
    for partition, db in sorted(getattr(store, "_dbs", {}).items()):
        try:
            entries = int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
        except Exception:
            entries = None
        mine = stats.get(partition, {})
        result[partition] = {
            "entries": entries,
            "marked_by_this_worker": mine.get("marked", 0),
            "oldest_ms": mine.get("oldest"),
            "newest_ms": mine.get("newest"),
        }
    return result


@contextmanager
def as_event(event: EventT) -> Iterator[None]:
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def known(pairs: Iterable[tuple[EventT, str]], now_ms: int | None = None) -> set[str]:
    """The event ids of `pairs` (event, event_id) that the table holds within the horizon."""
    cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - HORIZON_MS
    found: set[str] = set()
    for event, event_id in pairs:
        with as_event(event):
            first_seen = processed_ids.get(event_id)
        if first_seen is not None and first_seen >= cutoff:
            found.add(event_id)
    return found


def mark(pairs: Iterable[tuple[EventT, str]], now_ms: int | None = None) -> None:
    written_at = now_ms if now_ms is not None else int(time.time() * 1000)
    for event, event_id in pairs:
        with as_event(event):
            processed_ids[event_id] = written_at
        partition_stats = stats.setdefault(event.message.partition, {"marked": 0, "oldest": written_at})
        partition_stats["marked"] += 1
        partition_stats["newest"] = written_at


__all__ = ["known", "mark", "processed_ids", "stats", "sync_events"]
