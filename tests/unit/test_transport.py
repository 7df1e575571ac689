"""The two fixes app/transport.py makes to faust-streaming's Kafka consumer, on the consumer's own state.

(tests/faults/test_rebalance.py shows them end to end: two workers, real rebalances, every event once.)
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.types import TP

from app import transport
from app.factory import create_app
from app.settings import Settings

# A topic without a batch lane: what reaches Faust is what the tests look at.
PARTITION = TP(Settings().retry_topic, 0)


@pytest.fixture
def consumer() -> transport.Consumer:
    app = create_app(Settings())
    app.topics.acks_enabled_for = lambda topic: True
    built = app.consumer
    assert isinstance(built, transport.Consumer), "create_app must run on the memsync transport"
    return built


def test_the_message_at_the_committed_offset_holds_the_commit_back(consumer):
    consumer._committed_offset[PARTITION] = 772
    consumer._acked[PARTITION] = [773, 774, 775]
    consumer._acked_index[PARTITION] = {773, 774, 775}
    # faust-streaming's own test lets this through and commits 776 over the unfinished 772.
    assert consumer._new_offset(PARTITION) is None
    consumer._acked[PARTITION].insert(0, 772)
    consumer._acked_index[PARTITION].add(772)
    assert consumer._new_offset(PARTITION) == 776
    assert consumer._acked[PARTITION] == []
    assert consumer._acked_index[PARTITION] == set()


def test_the_commit_stops_at_the_first_hole(consumer):
    consumer._committed_offset[PARTITION] = 10
    consumer._acked[PARTITION] = [13, 10, 11, 14]
    consumer._acked_index[PARTITION] = {10, 11, 13, 14}
    assert consumer._new_offset(PARTITION) == 12
    assert consumer._acked[PARTITION] == [13, 14]
    assert consumer._new_offset(PARTITION) is None  # 12 is still in flight


def test_offsets_skipped_by_compaction_count_as_done(consumer):
    consumer._committed_offset[PARTITION] = 10
    consumer._acked[PARTITION] = [10, 15]
    consumer._acked_index[PARTITION] = {10, 15}
    consumer._gap[PARTITION].addi(11, 15)
    assert consumer._new_offset(PARTITION) == 16


def records_from(*offsets: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(offset=offset) for offset in offsets]


@pytest.fixture
def fetching(consumer, monkeypatch):
    """The consumer with a scripted fetch underneath, and the seeks it asks the Kafka client for."""
    fetches: list[dict] = []
    sought: list[tuple[TP, int]] = []

    async def fetch(self, timeout):
        return fetches.pop(0), {PARTITION}

    async def seek_client(partition: TP, offset: int) -> None:
        sought.append((partition, offset))

    monkeypatch.setattr(transport.AIOKafkaConsumer, "_wait_next_records", fetch)
    monkeypatch.setattr(consumer, "_seek", seek_client)
    monkeypatch.setattr(consumer, "assignment", lambda: {PARTITION})

    def next_fetch(records: dict) -> dict:
        fetches.append(records)
        kept, _ = asyncio.run(consumer._wait_next_records(1.0))
        return kept

    return SimpleNamespace(consumer=consumer, next_fetch=next_fetch, sought=sought)


def test_a_fetch_that_continues_where_reading_stopped_passes(fetching):
    fetching.consumer._read_offset[PARTITION] = 771
    records = {PARTITION: records_from(772, 773)}
    assert fetching.next_fetch(records) == records
    assert fetching.sought == []


def test_a_fetch_from_before_a_rebalance_seek_is_dropped_and_the_partition_sought_back(fetching):
    asyncio.run(fetching.consumer.seek(PARTITION, 772))  # the rebalance: back to the committed offset
    fetching.sought.clear()
    # The records of a fetch issued before that seek, further on in the partition.
    assert fetching.next_fetch({PARTITION: records_from(1100, 1101)}) == {}
    assert fetching.sought == [(PARTITION, 772)]
    # Even one past: the message at the committed offset must not be skipped.
    assert fetching.next_fetch({PARTITION: records_from(773)}) == {}
    assert fetching.sought == [(PARTITION, 772), (PARTITION, 772)]
    records = {PARTITION: records_from(772, 773)}
    assert fetching.next_fetch(records) == records


def test_a_fetch_that_skips_past_what_was_read_is_sought_back(fetching):
    fetching.consumer._read_offset[PARTITION] = 500  # Faust stopped mid-fetch at 500 (a generation change)
    assert fetching.next_fetch({PARTITION: records_from(640)}) == {}
    assert fetching.sought == [(PARTITION, 501)]


def test_a_hole_that_is_still_there_after_the_seek_is_real_and_let_through(fetching):
    fetching.consumer._read_offset[PARTITION] = 500
    assert fetching.next_fetch({PARTITION: records_from(503)}) == {}
    records = {PARTITION: records_from(503, 504)}  # e.g. transaction markers at 501 and 502
    assert fetching.next_fetch(records) == records
    assert fetching.sought == [(PARTITION, 501)]


def test_topics_without_acks_are_not_checked(fetching):
    fetching.consumer.app.topics.acks_enabled_for = lambda topic: False
    fetching.consumer._read_offset[PARTITION] = 10
    records = {PARTITION: records_from(900)}
    assert fetching.next_fetch(records) == records
