"""The idempotency table: event ids already written to ClickHouse, per partition of the sync topic.

RocksDB-backed and changelog-backed, so it survives restarts and rebalances. The value is the time
(epoch ms) the id was first written. Growth is bounded by IDEMPOTENCY_HORIZON_HOURS (default 7 days,
the DLQ's retention, so a replayed DLQ record is still recognised): RocksDB's TTL drops older keys at
compaction, the changelog is `compact,delete` with the same retention so a recovery onto a new disk
does not bring them back, and `known()` ignores entries older than the horizon so behaviour does not
depend on when compaction ran. Windowed tables are not used: their expiry state is rebuilt only on
set, not on recovery (faust-streaming #385).

Reads and writes go to the partition's RocksDB directly, a batch at a time, with the same bytes in the
same places as Faust's per-key `table[key] = value` (see `mark`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from faust.types import TP
from rocksdict import WriteBatch

from app import app, settings
from app.lane import Delivery
from app.topics import sync_events

log = logging.getLogger(__name__)

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


@cache
def _key_encoder() -> Callable[[str], bytes]:
    """The table's key serializer (JSON) for event ids, without Faust's registry where it is plain.

    Event ids are UUIDs: printable ASCII without quotes or backslashes, whose JSON is the id in quotes.
    Anything else goes through Faust's serializer, as does every key if the table's serializer is not
    JSON."""
    encode = processed_ids.data._encode_key
    if encode("probe-id") != b'"probe-id"':
        return encode

    def encode_event_id(event_id: str) -> bytes:
        if event_id.isascii() and event_id.isprintable() and '"' not in event_id and "\\" not in event_id:
            return b'"' + event_id.encode() + b'"'
        return encode(event_id)

    return encode_event_id


def known(pairs: Iterable[tuple[Delivery, str]], now_ms: int | None = None) -> set[str]:
    """The event ids of `pairs` (delivery, event_id) that the table holds within the horizon."""
    cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - HORIZON_MS
    store = processed_ids.data
    encode_key = _key_encoder()
    found: set[str] = set()
    for partition, event_ids in _by_partition(pairs).items():
        values = store._db_for_partition(partition)[[encode_key(event_id) for event_id in event_ids]]
        for event_id, raw in zip(event_ids, values, strict=True):
            if raw is not None and store._decode_value(raw) >= cutoff:
                found.add(event_id)
    return found


async def mark(pairs: Iterable[tuple[Delivery, str]], now_ms: int | None = None) -> None:
    """Record the ids as written: one RocksDB write batch and one changelog produce per partition.

    The same bytes Faust's `table[key] = value` would write, to the same places, without its cost of a
    store call and a buffered changelog send per key (half of the real-time path's time before)."""
    written_at = now_ms if now_ms is not None else int(time.time() * 1000)
    store = processed_ids.data
    value = store._encode_value(written_at)
    encode_key = _key_encoder()
    for partition, event_ids in _by_partition(pairs).items():
        keys = [encode_key(event_id) for event_id in event_ids]
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.put(key, value)
        store._db_for_partition(partition).write(batch)
        await _send_changelog(partition, keys, value)
        partition_stats = stats.setdefault(partition, {"marked": 0, "oldest": written_at})
        partition_stats["marked"] += len(keys)
        partition_stats["newest"] = written_at


def _by_partition(pairs: Iterable[tuple[Delivery, str]]) -> dict[int, list[str]]:
    # The sync and retry topics have the table's partition count and the same key, so the delivery's
    # partition is the table partition of its event.
    grouped: dict[int, list[str]] = defaultdict(list)
    for delivery, event_id in pairs:
        grouped[delivery.message.partition].append(event_id)
    return grouped


# Changelog deliveries still awaited: kept referenced until done (a bare task may be collected).
_deliveries: set[asyncio.Task[None]] = set()


async def _send_changelog(partition: int, keys: list[bytes], value: bytes | None) -> None:
    """Hand the marks to the producer for the table's changelog partition, in as few record batches
    as fit. Returns once they are queued, not delivered, as Faust's own `table[key] = value` does: the
    batch is acked meanwhile. A mark lost with an undelivered changelog costs, after a crash that also
    loses this worker's RocksDB, one ClickHouse lookup hit, not a duplicate row."""
    producer = app.producer._ensure_producer()
    topic = processed_ids.changelog_topic.get_topic_name()
    sent: list[tuple[asyncio.Future, int]] = []

    async def send(batch: Any) -> None:
        count = batch.record_count()
        sent.append((await producer.send_batch(batch, topic, partition=partition), count))

    batch = producer.create_batch()
    for key in keys:
        if batch.append(key=key, value=value, timestamp=None) is None:
            await send(batch)
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    await send(batch)
    task = asyncio.create_task(_persisted_once_delivered(topic, partition, sent))
    _deliveries.add(task)
    task.add_done_callback(_deliveries.discard)


_persisted: dict[int, int] = {}


async def _persisted_once_delivered(
    topic: str, partition: int, sent: list[tuple[asyncio.Future, int]]
) -> None:
    try:
        last_offset = -1
        for delivered, count in sent:
            metadata = await delivered
            last_offset = max(last_offset, metadata.offset + count - 1)
    except Exception as exc:  # the marks stay in RocksDB; the ClickHouse lookup covers a restore
        log.warning("idempotency changelog %s[%d]: marks not delivered: %s", topic, partition, exc)
        return
    # What a recovery of this partition can skip: these marks are in the local RocksDB already. Never
    # backwards, should two batches' deliveries resolve out of order.
    # Only while the partition is still open here: after a revocation, writing it would reopen it.
    store = processed_ids.data
    if last_offset > _persisted.get(partition, -1) and partition in getattr(store, "_dbs", {}):
        _persisted[partition] = last_offset
        store.set_persisted_offset(TP(topic, partition), last_offset)


__all__ = ["known", "mark", "processed_ids", "stats", "sync_events"]
