"""The batch lane (app/lane.py) on the real consumer object, fed the records a fetch would return.

(tests/integration/test_realtime.py and tests/faults run it against Kafka and ClickHouse.)
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.types import TP

from app import transport
from app.factory import create_app
from app.lane import StaleBatch
from app.settings import Settings
from app.sink import BatchReport, CheckedBatch, PreparedBatch

SETTINGS = Settings()
SYNC = TP(SETTINGS.sync_topic, 0)
OTHER = TP(SETTINGS.retry_topic, 0)


def records(tp: TP, *offsets: int) -> list[ConsumerRecord]:
    return [
        ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", b"v", None, 1, 1, ())
        for offset in offsets
    ]


@pytest.fixture
def consumer(monkeypatch) -> transport.Consumer:
    app = create_app(SETTINGS)
    app.topics.acks_enabled_for = lambda topic: True
    built = app.consumer
    monkeypatch.setattr(built, "assignment", lambda: {SYNC, OTHER})
    monkeypatch.setattr(built, "highwater", lambda tp: 0)
    built._set_active_tps({SYNC, OTHER})
    return built


def fetch(consumer: transport.Consumer, monkeypatch, fetched: dict) -> dict:
    async def wait_next_records(self, timeout):
        return fetched, {SYNC, OTHER}

    monkeypatch.setattr(transport.AIOKafkaConsumer, "_wait_next_records", wait_next_records)
    left, _ = asyncio.run(consumer._wait_next_records(1.0))
    return left


def offsets(events) -> list[int]:
    return [event.message.offset for event in events]


def test_the_sync_topic_goes_to_its_lane_and_the_others_to_faust(consumer, monkeypatch):
    lane = consumer.lanes[SETTINGS.sync_topic]
    lane.high_water = 3
    other = records(OTHER, 5)
    # Fetches are keyed by aiokafka's TopicPartition, not Faust's TP.
    fetched = {TopicPartition(SYNC.topic, 0): records(SYNC, 0, 1, 2), TopicPartition(OTHER.topic, 0): other}
    left = fetch(consumer, monkeypatch, fetched)
    assert left == {OTHER: other}
    assert len(lane) == 3
    assert consumer._read_offset[SYNC] == 2  # the next fetch must start at 3, or it is sought back
    assert SYNC not in consumer._get_active_partitions()  # at high water
    taken = asyncio.run(lane.take(10, within=0.01))
    assert offsets(taken) == [0, 1, 2]
    assert all(type(event.message.tp) is TP and event.message.tp == SYNC for event in taken)
    assert consumer._get_active_partitions() == {SYNC, OTHER}  # Faust asserts these are TPs


def test_take_returns_as_soon_as_the_batch_is_full_and_keeps_order(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]
    lane.deliver(SYNC, records(SYNC, *range(0, 5)))
    lane.deliver(SYNC, records(SYNC, *range(5, 9)))

    async def take_full():
        return await asyncio.wait_for(lane.take(6, within=60), timeout=5)

    assert offsets(asyncio.run(take_full())) == [0, 1, 2, 3, 4, 5]
    assert offsets(asyncio.run(lane.take(6, within=0.01))) == [6, 7, 8]


def test_take_waits_for_the_first_record_then_at_most_within(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]

    async def scenario():
        taking = asyncio.ensure_future(lane.take(100, within=0.05))
        await asyncio.sleep(0.05)
        assert not taking.done(), "nothing pending: take must wait"
        lane.deliver(SYNC, records(SYNC, 0))
        return await asyncio.wait_for(taking, timeout=5)

    assert offsets(asyncio.run(scenario())) == [0]


def test_above_high_water_the_partition_leaves_the_fetch_until_the_lane_drains(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]
    lane.high_water = 10
    lane.deliver(SYNC, records(SYNC, *range(0, 12)))
    assert SYNC not in consumer._get_active_partitions()
    assert OTHER in consumer._get_active_partitions()
    asyncio.run(lane.take(4, within=0.01))  # 8 left: still above half
    assert SYNC not in consumer._get_active_partitions()
    asyncio.run(lane.take(4, within=0.01))  # 4 left
    assert SYNC in consumer._get_active_partitions()


def test_messages_from_before_a_rebalance_are_dropped_unacked(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]
    lane.deliver(SYNC, records(SYNC, 0, 1))
    consumer.app.consumer_generation_id += 1
    lane.deliver(SYNC, records(SYNC, 0, 1, 2))  # read again from the committed offset
    assert offsets(asyncio.run(lane.take(10, within=0.01))) == [0, 1, 2]
    assert consumer._acked[SYNC] == []


def test_without_realtime_sync_there_is_no_lane():
    app = create_app(Settings(enable_realtime_sync=False))
    assert app.consumer.lanes == {}


def test_ack_batch_is_what_the_commit_follows(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]
    consumer._committed_offset[SYNC] = 10
    lane.deliver(SYNC, records(SYNC, 8, 9, 10, 11, 12, 13))
    taken = asyncio.run(lane.take(10, within=0.01))
    consumer.ack_batch(taken[:2])  # below the committed offset: already done, ignored
    assert consumer._acked[SYNC] == []
    consumer.ack_batch([taken[3], taken[4]])  # 11, 12: 10 is still in flight
    assert consumer._new_offset(SYNC) is None
    consumer.ack_batch(taken[2:5])  # 10, and 11 and 12 again
    assert consumer._n_acked == 3
    assert consumer._new_offset(SYNC) == 13


def test_a_batch_is_written_only_while_its_generation_holds_its_partitions(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]
    taken_in = consumer.app.consumer_generation_id

    async def write_once(generation: int) -> None:
        async with lane.writing(generation):
            pass

    asyncio.run(write_once(taken_in))
    asyncio.run(lane.on_partitions_revoked())  # a rebalance begins
    with pytest.raises(StaleBatch):
        asyncio.run(write_once(taken_in))
    consumer.app.consumer_generation_id += 1  # ... and assigns again
    with pytest.raises(StaleBatch):
        asyncio.run(write_once(taken_in))
    asyncio.run(write_once(consumer.app.consumer_generation_id))  # batches of the new generation write


def test_a_revocation_waits_for_the_write_in_flight(consumer):
    lane = consumer.lanes[SETTINGS.sync_topic]
    order: list[str] = []

    async def scenario():
        insert_started = asyncio.Event()

        async def insert() -> None:
            async with lane.writing(consumer.app.consumer_generation_id):
                insert_started.set()
                await asyncio.sleep(0.05)
                order.append("insert done")

        writing = asyncio.ensure_future(insert())
        await insert_started.wait()
        await lane.on_partitions_revoked()
        order.append("revoked")
        await writing

    asyncio.run(scenario())
    assert order == ["insert done", "revoked"]


def test_the_writer_drops_a_stale_batch_unacked_and_goes_on(consumer):
    from app.sink import PipelinedWriter

    lane = consumer.lanes[SETTINGS.sync_topic]
    handled: list[list[int]] = []
    acked: list[list[int]] = []

    class Sink:
        def prepare(self, events):
            return PreparedBatch(events, [], [], 0)

        async def check(self, prepared):
            return CheckedBatch(prepared, BatchReport(), [])

        async def commit(self, checked, fence=None, written_since_check=frozenset()):
            async with fence():
                handled.append(offsets(checked.prepared.events))
            return BatchReport(), []

    async def scenario():
        old = consumer.app.consumer_generation_id
        lane.deliver(SYNC, records(SYNC, 0, 1))
        stale = await lane.take(10, within=0.01)
        await lane.on_partitions_revoked()
        consumer.app.consumer_generation_id = old + 1
        lane.deliver(SYNC, records(SYNC, 0, 1, 2))
        fresh = await lane.take(10, within=0.01)
        writer = PipelinedWriter(
            Sink(),
            lambda events: acked.append(offsets(events)),
            lambda events: (lambda: lane.writing(events[0].message.generation_id)),
        )
        await writer.submit(stale)
        await writer.submit(fresh)
        while not acked:
            await asyncio.sleep(0.01)
        await writer.close()

    asyncio.run(scenario())
    assert handled == [[0, 1, 2]]
    assert acked == [[0, 1, 2]]
