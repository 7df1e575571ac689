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
from dataclasses import dataclass
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

# Marks this process made, kept as it goes (cheap); what the partitions hold comes from `scans`.
stats: dict[int, dict[str, int]] = {}

# ------------------------------------------------------------------ table stats (/stats)
# What each partition's RocksDB holds (entries, oldest/newest mark) needs a read of every value, so it
# is computed in a thread, after recovery and then every TABLE_STATS_INTERVAL_S (or when the set of
# open partitions changes), and cached for the stats view.

TABLE_STATS_INTERVAL_S = 600.0
TABLE_STATS_TICK_S = 5.0


@dataclass(frozen=True, slots=True)
class PartitionScan:
    entries: int
    expired: int  # older than the horizon: known() ignores them, RocksDB drops them at compaction
    oldest_ms: int | None
    newest_ms: int | None
    scanned_at_ms: int
    scan_s: float


scans: dict[int, PartitionScan] = {}
_scan_lock = asyncio.Lock()
_scanned_partitions: frozenset[int] = frozenset()
_scanned_at = 0.0


# Faust keeps the partition's changelog offset in the same RocksDB, under this key.
FAUST_OFFSET_KEY: bytes = getattr(type(processed_ids.data), "offset_key", b"__faust\0offset__")


class ScanAborted(Exception):
    """A rebalance began: the scan lets go of the partitions' databases so Faust can reopen them."""


def scan_partition(
    db: Any, decode_value: Callable[[bytes], Any], now_ms: int, stop: Callable[[], bool] = lambda: False
) -> PartitionScan:
    """Read every value (the epoch ms an id was first written) of one partition's RocksDB.

    Blocking: run it in a thread. RocksDB iterators read a consistent snapshot while marks go on.
    `stop` is polled every few thousand entries; when it says so, the scan raises ScanAborted: a
    revoked partition's database must not stay open in a scan while Faust reopens it elsewhere."""
    started = time.perf_counter()
    cutoff = now_ms - HORIZON_MS
    entries = expired = 0
    oldest: int | None = None
    newest: int | None = None
    for key, raw in db.items():
        if key == FAUST_OFFSET_KEY:
            continue
        if not entries % 4096 and stop():
            raise ScanAborted
        try:
            written_at = int(raw)  # the JSON of an int is its digits
        except (TypeError, ValueError):
            written_at = int(decode_value(raw))
        entries += 1
        if written_at < cutoff:
            expired += 1
        if oldest is None or written_at < oldest:
            oldest = written_at
        if newest is None or written_at > newest:
            newest = written_at
    return PartitionScan(entries, expired, oldest, newest, now_ms, round(time.perf_counter() - started, 3))


def _scan_all(
    dbs: dict[int, Any], decode_value: Callable[[bytes], Any], stop: Callable[[], bool]
) -> dict[int, PartitionScan]:
    now_ms = int(time.time() * 1000)
    try:
        return {
            partition: scan_partition(db, decode_value, now_ms, stop) for partition, db in sorted(dbs.items())
        }
    finally:
        dbs.clear()  # no reference to a database outlives the scan


def _rebalance_began(generation: int) -> Callable[[], bool]:
    return lambda: bool(app.rebalancing) or app.consumer_generation_id != generation


def _open_dbs() -> dict[int, Any]:
    return dict(getattr(processed_ids.data, "_dbs", {}))


async def refresh_partition_stats() -> dict[int, PartitionScan]:
    """Scan the partitions open on this worker (active and standby) off the event loop; one scan at a
    time, a caller arriving during a scan waits for it and gets its result."""
    global _scanned_partitions, _scanned_at
    async with _scan_lock:
        dbs = _open_dbs()
        partitions = frozenset(dbs)
        stop = _rebalance_began(app.consumer_generation_id)
        results = await asyncio.to_thread(_scan_all, dbs, processed_ids.data._decode_value, stop)
        scans.clear()
        scans.update(results)
        _scanned_partitions = partitions
        _scanned_at = time.monotonic()
        return dict(scans)


def scan_due(now: float | None = None) -> bool:
    """After the table's recovery: never scanned, the interval passed, or the open partitions changed."""
    if app.rebalancing or not app.tables.recovery.completed.is_set():
        return False
    now = time.monotonic() if now is None else now
    return (
        _scanned_at == 0.0
        or now - _scanned_at >= TABLE_STATS_INTERVAL_S
        or frozenset(_open_dbs()) != _scanned_partitions
    )


@app.timer(TABLE_STATS_TICK_S)
async def table_stats_timer() -> None:
    if not scan_due() or _scan_lock.locked():
        return
    try:
        await refresh_partition_stats()
    except ScanAborted:
        log.info("idempotency table scan for /stats stopped by a rebalance; it runs again after it")
    except Exception as exc:  # a timer that raises kills the worker; stats are not worth that
        log.warning("could not scan the idempotency table for /stats: %s", exc)


def partition_roles() -> dict[int, str]:
    """"active" or "standby" per partition of the table this worker is assigned."""
    changelog = processed_ids.changelog_topic.get_topic_name()
    assignor = app.assignor
    roles: dict[int, str] = {}
    for tp in assignor.assigned_standbys():
        if tp.topic == changelog:
            roles[tp.partition] = "standby"
    for tp in assignor.assigned_actives():
        if tp.topic in {changelog, sync_events.get_topic_name()}:
            roles[tp.partition] = "active"
    return roles


def partition_stats() -> dict[int, dict[str, Any]]:
    """Per partition open here or last scanned: its role, the last scan's counts (None until the first
    scan), and the marks this process made."""
    roles = partition_roles()
    result: dict[int, dict[str, Any]] = {}
    for partition in sorted(set(_open_dbs()) | set(scans) | set(roles)):
        scan = scans.get(partition)
        mine = stats.get(partition, {})
        result[partition] = {
            "role": roles.get(partition, "unassigned"),
            "entries": scan.entries if scan else None,
            "expired_entries": scan.expired if scan else None,
            "oldest_ms": scan.oldest_ms if scan else None,
            "newest_ms": scan.newest_ms if scan else None,
            "scanned_at_ms": scan.scanned_at_ms if scan else None,
            "scan_s": scan.scan_s if scan else None,
            "marked_by_this_worker": mine.get("marked", 0),
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
