"""app.lag against a fake of the consumer it reads (no broker): what the lag gauges and the refresh
timestamp say for committed, never-committed, unanswered and revoked partitions."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping

import pytest
from faust.types import TP

from app import lag, metrics, settings

SYNC = settings.sync_topic
RETRY = settings.retry_topic


class FakeConsumer:
    def __init__(
        self,
        highwaters: Mapping[TP, int],
        committed: Mapping[TP, int | None],
        earliest: Mapping[TP, int] | None = None,
        assigned: set[TP] | None = None,
        fail: Exception | None = None,
    ) -> None:
        self._highwaters = dict(highwaters)
        self._committed_offset = dict(committed)
        self._earliest = dict(earliest or {})
        self._assigned = set(assigned if assigned is not None else highwaters)
        self.fail = fail
        self.earliest_asked: list[TP] = []

    def assignment(self) -> set[TP]:
        return set(self._assigned)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        if self.fail is not None:
            raise self.fail
        return {tp: self._highwaters[tp] for tp in partitions if tp in self._highwaters}

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]:
        self.earliest_asked.extend(partitions)
        return {tp: self._earliest.get(tp, 0) for tp in partitions}


def gauge(topic: str, partition: int) -> float | None:
    return metrics.registry.get_sample_value(
        "memory_sync_consumer_lag", {"topic": topic, "partition": str(partition)}
    )


def refreshed_at() -> float:
    value = metrics.registry.get_sample_value("memory_sync_consumer_lag_refreshed_timestamp_seconds")
    assert value is not None
    return value


@pytest.fixture(autouse=True)
def clean_state() -> Iterator[None]:
    lag.latest.clear()
    metrics.consumer_lag.clear()
    metrics.consumer_lag_refreshed.set(0)
    yield
    lag.latest.clear()
    metrics.consumer_lag.clear()
    metrics.consumer_lag_refreshed.set(0)


def refresh(consumer: FakeConsumer) -> dict[str, dict[int, int]]:
    return asyncio.run(lag.refresh_lag(consumer))


def test_lag_is_high_water_minus_committed_per_assigned_partition():
    consumer = FakeConsumer(
        highwaters={TP(SYNC, 0): 100, TP(SYNC, 1): 50, TP(RETRY, 0): 7, TP("other", 0): 999},
        committed={TP(SYNC, 0): 40, TP(SYNC, 1): 50, TP(RETRY, 0): 2, TP("other", 0): 0},
    )
    assert refresh(consumer) == {SYNC: {0: 60, 1: 0}, RETRY: {0: 5}}
    assert gauge(SYNC, 0) == 60
    assert gauge(SYNC, 1) == 0
    assert gauge(RETRY, 0) == 5
    assert gauge("other", 0) is None  # only memsync's topics
    assert consumer.earliest_asked == []
    assert refreshed_at() > 0


def test_a_partition_the_group_never_committed_counts_from_the_log_start():
    """auto_offset_reset is "earliest": the records before the log start are gone, not lag."""
    consumer = FakeConsumer(
        highwaters={TP(SYNC, 0): 100, TP(SYNC, 1): 30},
        committed={TP(SYNC, 1): 10},  # partition 0: never committed (Faust's default is None)
        earliest={TP(SYNC, 0): 40},
    )
    assert refresh(consumer) == {SYNC: {0: 60, 1: 20}}
    assert consumer.earliest_asked == [TP(SYNC, 0)]
    assert gauge(SYNC, 0) == 60


def test_a_partition_without_a_high_water_keeps_its_last_value_and_the_refresh_is_incomplete():
    both = {TP(SYNC, 0): 10, TP(SYNC, 1): 20}
    first = FakeConsumer(highwaters=both, committed=dict.fromkeys(both, 0))
    refresh(first)
    stamp = refreshed_at()
    metrics.consumer_lag_refreshed.set(stamp - 100)  # so that an update would show
    second = FakeConsumer(
        highwaters={TP(SYNC, 0): 15},
        committed={TP(SYNC, 0): 0, TP(SYNC, 1): 0, TP(SYNC, 2): 0},
        assigned={TP(SYNC, 0), TP(SYNC, 1), TP(SYNC, 2)},
    )
    assert refresh(second) == {SYNC: {0: 15, 1: 20}}
    assert gauge(SYNC, 1) == 20  # still assigned: not dropped, not invented
    assert gauge(SYNC, 2) is None
    assert refreshed_at() == stamp - 100


def test_revoked_partitions_stop_being_reported():
    both = {TP(SYNC, 0): 10, TP(SYNC, 1): 20}
    refresh(FakeConsumer(highwaters=both, committed=dict.fromkeys(both, 0)))
    assert gauge(SYNC, 1) == 20
    refresh(FakeConsumer(highwaters=both, committed=dict.fromkeys(both, 0), assigned={TP(SYNC, 0)}))
    assert gauge(SYNC, 0) == 10
    assert gauge(SYNC, 1) is None
    assert lag.latest == {SYNC: {0: 10}}
    refresh(FakeConsumer(highwaters={}, committed={}, assigned=set()))
    assert gauge(SYNC, 0) is None
    assert lag.latest == {}
    assert refreshed_at() > 0  # nothing assigned is a complete refresh


def test_a_failed_refresh_keeps_the_gauges_and_the_old_timestamp():
    tp = TP(SYNC, 0)
    refresh(FakeConsumer(highwaters={tp: 10}, committed={tp: 0}))
    metrics.consumer_lag_refreshed.set(1234.0)
    with pytest.raises(ConnectionError):
        refresh(FakeConsumer(highwaters={tp: 10}, committed={tp: 0}, fail=ConnectionError("broker down")))
    assert gauge(SYNC, 0) == 10
    assert lag.latest == {SYNC: {0: 10}}
    assert refreshed_at() == 1234.0
