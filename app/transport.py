"""The Kafka transport the worker runs on: faust-streaming's aiokafka driver with two fixes, and the
hand-over of whole fetches to batch lanes (app/lane.py).

A fetch can straddle a rebalance. `Consumer.getmany` awaits records from the consumer thread; if the
group rebalances meanwhile, Faust seeks every partition back to its committed offset and resumes,
and only then do the awaited records arrive: records from the positions *before* that seek, stamped
with the new generation (faust-streaming records the generation after the fetch, PR #235). Faust then
takes the first of them as the next offset, sees a jump from the committed offset, registers the
offsets in between as a "gap" (which it treats as acknowledged, meant for compacted topics) and drops
the re-fetched copies of those offsets as already read. The events in between are never processed:
lost with lag 0 if the gap reaches the commit, a stalled partition otherwise (faust-streaming #216,
#221, #606; reproduced by tests/faults/test_rebalance.py).

The fix: for the topics whose messages are acknowledged (the agents' input topics, none of them
compacted, so their offsets have no holes), the first record of a partition in a fetch must be the
next offset Faust expects: the offset it last sought to, or the one after the last it read. A fetch
that starts further on is from a position the partition no longer has; its records for that partition
are dropped and the partition is sought back to the expected offset, so Kafka hands the skipped
records over. A jump that is still there after that seek is a real hole (transaction markers, a
retention cut) and is let through to Faust as before.

A second fix is in how the next commit is chosen. Faust keeps the acknowledged offsets of a partition
and commits the first run of consecutive ones, unless it does not start at the committed offset (the
next one to read). Its test, `min(acked) - committed > 1`, lets a run that starts one past the
committed offset through, so the message *at* the committed offset, still in flight, is committed
over: lost if the worker dies or the partition moves before it is done. `Consumer._new_offset`
below is faust-streaming 0.15.3's own with that test made `min(acked) > committed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from faust.transport.consumer import RecordMap
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP
from faust.types.tuples import ack_lock
from faust.utils.functional import consecutive_numbers
from mode.utils.futures import notify

from app.lane import BatchLane, LaneMessage

SCHEME = "memsync-kafka"


class Consumer(AIOKafkaConsumer):
    def __post_init__(self) -> None:
        super().__post_init__()
        # Partition -> the offset it was last sought to and has not delivered a record from since.
        self._sought: dict[TP, int] = {}
        # Partition -> the offset a jump was found at and sought back from; a second jump to the same
        # offset is taken as a real hole.
        self._resought_from: dict[TP, int] = {}
        # Topics whose records go to a batch lane instead of Faust's streams (app/lane.py).
        self.lanes: dict[str, BatchLane] = {
            topic: BatchLane(self, topic, high_water=high_water)
            for topic, high_water in getattr(self.app, "batch_lanes", {}).items()
        }

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Before Faust hands the partitions back: a lane write in flight finishes, no other starts.
        for lane in self.lanes.values():
            await lane.on_partitions_revoked()
        await super().on_partitions_revoked(revoked)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        self._note_sought(committed)
        return committed

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None:
        await super().seek_wait(partitions)
        self._note_sought(partitions)

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._note_sought({partition: offset})

    def _note_sought(self, offsets: Mapping[TP, int | None]) -> None:
        for tp, offset in offsets.items():
            if offset is not None and offset >= 0:
                self._sought[tp] = offset
            else:  # reset by auto.offset.reset: the next offset is whatever Kafka starts at
                self._sought.pop(tp, None)

    async def _wait_next_records(self, timeout: float) -> tuple[RecordMap | None, set[TP] | None]:
        records, active_partitions = await super()._wait_next_records(timeout)
        if not records:
            return records, active_partitions
        kept: dict[TP, list[Any]] = {}
        for tp, batch in records.items():
            expected = self._expected_offset(tp)
            first = batch[0].offset if batch else None
            if first is None or expected is None or first <= expected or self._resought_from.get(tp) == first:
                self._resought_from.pop(tp, None)
                self._sought.pop(tp, None)
                kept[tp] = batch
            else:
                await self._seek_back(tp, expected, first)
        if self.lanes:
            self._deliver_to_lanes(kept, active_partitions)
        return kept, active_partitions

    def _deliver_to_lanes(self, records: dict[TP, list[Any]], active_partitions: set[TP] | None) -> None:
        for tp in [tp for tp in records if tp.topic in self.lanes]:
            batch = records.pop(tp)
            if not batch:
                continue
            if (
                active_partitions is not None
                and tp not in active_partitions
                and tp not in self._buffered_partitions
            ):
                continue  # as Faust's getmany does: paused meanwhile; the continuity check re-reads them
            # aiokafka's TopicPartition equals Faust's TP, but Faust's partition sets assert the type.
            self.lanes[tp.topic].deliver(TP(tp.topic, tp.partition), batch)
            self._read_offset[tp] = batch[-1].offset
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))

    def _expected_offset(self, tp: TP) -> int | None:
        if not self.app.topics.acks_enabled_for(tp.topic):
            return None
        if tp in self._sought:
            return self._sought[tp]
        last_read = self._read_offset.get(tp)
        return None if last_read is None else last_read + 1

    async def _seek_back(self, tp: TP, expected: int, first: int) -> None:
        self.log.warning(
            "Fetch of %s starts at offset %d, expected %d (fetched before a seek): seeking back",
            tp,
            first,
            expected,
        )
        self._resought_from[tp] = first
        if tp in self.assignment():
            await self.seek(tp, expected)

    def ack_batch(self, messages: Iterable[LaneMessage]) -> None:
        """`Consumer.ack` for lane messages, under one lock: the bookkeeping Faust's commits follow."""
        with ack_lock:
            for message in messages:
                tp, offset = message.tp, message.offset
                committed = self._committed_offset[tp]
                if committed is None or offset >= committed:
                    acked_index = self._acked_index[tp]
                    if offset not in acked_index:
                        acked_index.add(offset)
                        self._acked[tp].append(offset)
                        self._n_acked += 1
            notify(self._waiting_for_ack)

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if not acked:
            return None
        gaps = self._gap[tp]
        if gaps:
            # Offsets Faust saw skipped (compacted topics) count as acknowledged.
            max_offset = max(acked)
            skipped = sorted(gaps.overlap(0, max_offset), key=lambda interval: interval.begin)
            if skipped:
                filled = [offset for interval in skipped for offset in range(interval.begin, interval.end)]
                acked.extend(filled)
                gaps.chop(0, max(filled[-1], max_offset + 1))
        acked.sort()
        committed = self._committed_offset[tp]
        if committed is not None and acked[0] > committed:
            return None  # the message at the committed offset is not done yet
        run = next(consecutive_numbers(acked))
        acked[: len(run)] = []
        self._acked_index[tp].difference_update(run)
        return run[-1] + 1


class Transport(AIOKafkaTransport):
    Consumer = Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
