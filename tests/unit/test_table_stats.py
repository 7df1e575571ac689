"""The idempotency table's /stats numbers come from what its RocksDB holds (a real rocksdict store,
opened the way Faust opens the table's partitions), not from what this process marked."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faust.stores.rocksdb import RocksDBOptions
from faust.types import TP
from rocksdict import WriteBatch

from app import app, settings
from tables import processed

NOW_MS = 1_800_000_000_000


def open_partition(path: Path) -> Any:
    """A partition DB as the table's Store opens it: rocksdict, raw mode, with the table's TTL."""
    options = RocksDBOptions(use_rocksdict=True, ttl=settings.idempotency_horizon_hours * 3600)
    return options.open(path)


def write_marks(db: Any, marks: dict[str, int]) -> None:
    """The bytes mark() writes: the table's key and value serializers."""
    store = processed.processed_ids.data
    batch = WriteBatch(raw_mode=True)
    for event_id, written_at in marks.items():
        batch.put(store._encode_key(event_id), store._encode_value(written_at))
    db.write(batch)


@pytest.fixture
def partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, Any]]:
    dbs = {0: open_partition(tmp_path / "p0"), 3: open_partition(tmp_path / "p3")}
    monkeypatch.setattr(processed, "_open_dbs", lambda: dict(dbs))
    processed.scans.clear()
    yield dbs
    processed.scans.clear()
    for db in dbs.values():
        db.close()


def test_scan_counts_entries_and_finds_oldest_and_newest(partitions):
    expired_at = NOW_MS - processed.HORIZON_MS - 1
    write_marks(partitions[0], {"a": NOW_MS - 5000, "b": NOW_MS - 100, "c": expired_at, "d": NOW_MS - 2500})
    # Faust's own bookkeeping in the same DB (the changelog offset it recovered to): not an event id
    partitions[0].put(processed.processed_ids.data.offset_key, b"250")
    scan = processed.scan_partition(partitions[0], processed.processed_ids.data._decode_value, NOW_MS)
    assert (scan.entries, scan.expired, scan.oldest_ms, scan.newest_ms) == (4, 1, expired_at, NOW_MS - 100)
    assert scan.scanned_at_ms == NOW_MS


def test_a_scan_lets_go_of_the_databases_when_a_rebalance_begins(partitions, monkeypatch):
    """Faust reopens a revoked partition's RocksDB on reassignment; a scan holding it open would block
    that, so a rebalance stops the scan and the cached numbers stay."""
    write_marks(partitions[0], {f"id-{i}": NOW_MS for i in range(10)})
    decode = processed.processed_ids.data._decode_value
    with pytest.raises(processed.ScanAborted):
        processed.scan_partition(partitions[0], decode, NOW_MS, lambda: True)
    monkeypatch.setattr(app, "rebalancing", True, raising=False)
    with pytest.raises(processed.ScanAborted):
        asyncio.run(processed.refresh_partition_stats())
    assert processed.scans == {}


def test_an_empty_partition_has_no_oldest_or_newest(partitions):
    scan = processed.scan_partition(partitions[3], processed.processed_ids.data._decode_value, NOW_MS)
    assert (scan.entries, scan.expired, scan.oldest_ms, scan.newest_ms) == (0, 0, None, None)


def test_stats_after_a_restart_come_from_the_store_not_from_this_process(partitions, monkeypatch):
    """Nothing marked by this process (a restarted worker): the numbers are still there, read off the
    event loop, with each partition's role."""
    write_marks(partitions[0], {f"id-{i}": 1_700_000_000_000 + i for i in range(500)})
    write_marks(partitions[3], {"x": 1_700_000_100_000})
    monkeypatch.setattr(processed, "stats", {})
    monkeypatch.setattr(processed, "partition_roles", lambda: {0: "active", 3: "standby"})
    threads: list[str] = []
    real_scan = processed._scan_all

    def scan_all(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_scan(*args)

    monkeypatch.setattr(processed, "_scan_all", scan_all)
    before = processed.partition_stats()
    assert before[0]["entries"] is None  # not scanned yet: unknown, not 0
    assert before[0]["role"] == "active"

    asyncio.run(processed.refresh_partition_stats())
    assert threads
    assert threads[0] != threading.main_thread().name  # read off the event loop
    table = processed.partition_stats()
    assert table[0] | {"scanned_at_ms": None, "scan_s": None} == {
        "role": "active",
        "entries": 500,
        "expired_entries": 500,  # written in 2023: past the horizon today
        "oldest_ms": 1_700_000_000_000,
        "newest_ms": 1_700_000_000_499,
        "scanned_at_ms": None,
        "scan_s": None,
        "marked_by_this_worker": 0,
    }
    assert table[0]["scanned_at_ms"] is not None
    assert table[3]["role"] == "standby"
    assert (table[3]["entries"], table[3]["oldest_ms"], table[3]["newest_ms"]) == (
        1,
        1_700_000_100_000,
        1_700_000_100_000,
    )


def test_a_scan_is_due_after_recovery_then_on_the_interval_or_a_partition_change(partitions, monkeypatch):
    completed = app.tables.recovery.completed
    was_set = completed.is_set()
    try:
        completed.clear()
        monkeypatch.setattr(processed, "_scanned_at", 0.0)
        assert not processed.scan_due(now=10_000.0)  # recovering: the store is still filling
        completed.set()
        assert processed.scan_due(now=10_000.0)  # never scanned
        asyncio.run(processed.refresh_partition_stats())
        scanned_at = processed._scanned_at
        assert not processed.scan_due(now=scanned_at + 60)
        assert processed.scan_due(now=scanned_at + processed.TABLE_STATS_INTERVAL_S)
        monkeypatch.setattr(processed, "_open_dbs", lambda: {0: partitions[0]})  # partition 3 revoked
        assert processed.scan_due(now=scanned_at + 60)
    finally:
        if not was_set:
            completed.clear()


def test_roles_follow_the_assignment(monkeypatch):
    changelog = processed.processed_ids.changelog_topic.get_topic_name()

    class Assignor:
        def assigned_actives(self) -> set[TP]:
            return {TP(settings.sync_topic, 1), TP(changelog, 1), TP(changelog, 2)}

        def assigned_standbys(self) -> set[TP]:
            return {TP(changelog, 0)}

    monkeypatch.setattr(app, "assignor", Assignor())
    assert processed.partition_roles() == {0: "standby", 1: "active", 2: "active"}
