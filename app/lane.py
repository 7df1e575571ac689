"""The batch lane: a topic's records handed over as whole fetches, not one message at a time.

Faust delivers every message through the conductor, a channel queue, the stream and its processors:
about 100 µs per event on a small host, ten times what decoding and inserting the event costs, and
the reason the real-time path ran at a tenth of a plain `getmany` consumer (bench/RESULTS.md). A
topic with a lane (the sync topic) still belongs to Faust's consumer: same group, same assignment
(so the idempotency table stays co-partitioned with it), same offset bookkeeping and commits. Only
the delivery changes: `app.transport.Consumer` turns each fetch of the topic into messages and
appends them here; the sync agent takes batches of them and acks them once their rows are written
(`Consumer.ack_batch`: Faust's own ack bookkeeping, which its commits follow).

Backpressure is Faust's own: above `high_water` pending events the lane's partitions leave the fetch
(`Consumer.on_buffer_full`) and come back once half of that is taken. The fetch never blocks, so the
consumer keeps polling and keeps its group membership while ClickHouse is down.

Rebalances: a message carries the generation it was fetched in. Messages of an earlier generation are
dropped when taken, unacked: Faust seeks every partition it keeps back to its committed offset and the
new owner of a moved one starts there, so each is read again by whoever owns it now. The same holds for
a batch already taken: each ClickHouse write of it runs inside `writing(generation)`, which refuses
(`StaleBatch`) once a revocation has begun, and the revocation waits for the write in flight. So a
partition's old owner never writes after its new owner could have looked the rows up: the window in
which both would insert the same rows is closed, not just narrow.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from faust.types import TP, Message

if TYPE_CHECKING:
    from app.transport import Consumer


class Delivery(Protocol):
    """What the sink and the failure lane need of a delivered record: Faust's events and LaneMessage."""

    @property
    def message(self) -> Message | LaneMessage: ...


class StaleBatch(Exception):
    """A batch taken before a rebalance: not written, not acked; the partitions' owners read it again."""


class LaneMessage:
    """A fetched record as the sink reads it: the fields of Faust's `Message` it uses, in slots.

    A delivery is its own message (`.message` is itself), so the sink and the failure lane treat it
    like a Faust event. About a tenth of the cost of a `ConsumerMessage` and its event."""

    __slots__ = (
        "generation_id",
        "headers",
        "key",
        "offset",
        "partition",
        "timestamp",
        "topic",
        "tp",
        "value",
    )

    def __init__(self, tp: TP, record: Any, generation_id: int) -> None:
        self.topic = tp.topic
        self.partition = tp.partition
        self.offset: int = record.offset
        self.key: bytes | None = record.key
        self.value: bytes | None = record.value
        self.headers = record.headers
        self.timestamp: float | None = record.timestamp / 1000.0 if record.timestamp is not None else None
        self.tp = tp
        self.generation_id = generation_id

    @property
    def message(self) -> LaneMessage:
        return self

    def __repr__(self) -> str:
        return f"<LaneMessage {self.topic}[{self.partition}]@{self.offset}>"


class BatchLane:
    def __init__(self, consumer: Consumer, topic: str, *, high_water: int) -> None:
        self.consumer = consumer
        self.topic = topic
        self.high_water = high_water
        self._pending: deque[LaneMessage] = deque()
        self._arrived = asyncio.Event()
        self._held_back: set[TP] = set()
        self._revoked_generation: int | None = None
        self._writes_in_flight = 0
        self._no_writes_in_flight = asyncio.Event()
        self._no_writes_in_flight.set()

    def __len__(self) -> int:
        return len(self._pending)

    def deliver(self, tp: TP, records: Iterable[Any]) -> None:
        """Called by the consumer with one fetch's records of one partition, in offset order."""
        generation = self.consumer.app.consumer_generation_id
        self._pending.extend(LaneMessage(tp, record, generation) for record in records)
        self._arrived.set()
        if len(self._pending) >= self.high_water and not self.consumer.app.in_recovery:
            self.consumer.on_buffer_full(tp)
            self._held_back.add(tp)

    async def take(self, max_events: int, within: float) -> list[LaneMessage]:
        """Up to `max_events`: as soon as that many are pending, or `within` seconds after the first.

        May return an empty list (everything pending was from before a rebalance)."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self._pending) < max_events:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        pending = self._pending
        batch = [pending.popleft() for _ in range(min(max_events, len(pending)))]
        if len(pending) <= self.high_water // 2:
            self._release_held_back()
        generation = self.consumer.app.consumer_generation_id
        batch = [event for event in batch if event.message.generation_id == generation]
        # Faust's slow-processing check reads when a stream last took a partition's message.
        inbound = self.consumer.app.monitor.stream_inbound_time
        now = time.monotonic()
        for tp in {event.message.tp for event in batch}:
            inbound[tp] = now
        return batch

    @asynccontextmanager
    async def writing(self, generation: int) -> AsyncIterator[None]:
        """Around each ClickHouse write of a batch taken in `generation`."""
        if generation != self.consumer.app.consumer_generation_id or generation == self._revoked_generation:
            raise StaleBatch(f"taken in generation {generation}, before a rebalance")
        self._writes_in_flight += 1
        self._no_writes_in_flight.clear()
        try:
            yield
        finally:
            self._writes_in_flight -= 1
            if not self._writes_in_flight:
                self._no_writes_in_flight.set()

    async def on_partitions_revoked(self) -> None:
        """No write of the current generation starts from now on; returns when the one in flight ends."""
        self._revoked_generation = self.consumer.app.consumer_generation_id
        await self._no_writes_in_flight.wait()

    def _release_held_back(self) -> None:
        if not self._held_back:
            return
        assigned = self.consumer.assignment()
        for tp in self._held_back:
            if tp in assigned:
                self.consumer.on_buffer_drop(tp)
            else:
                self.consumer._buffered_partitions.discard(tp)
        self._held_back.clear()
