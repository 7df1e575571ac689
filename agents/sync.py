"""The real-time path: memory.sync.events → ClickHouse history, one batch at a time.

The agent subscribes to the sync topic (so Faust assigns its partitions, with the idempotency table's
alongside), but its records arrive through the topic's batch lane (app/lane.py), whole fetches at a
time, not through the stream. Order per batch: write ClickHouse (retrying while it is unavailable),
mark the ids in the idempotency table, route record-level failures, and only then ack each message to
the consumer, whose commits follow the acks. Batches overlap (app.sink.PipelinedWriter): the agent
decodes the next batch while the one before it is checked against the table and ClickHouse and the one
before that is written.
"""

from __future__ import annotations

from collections.abc import Sequence

from faust import StreamT

from app import app, settings
from app.lane import Delivery
from app.runtime import history, sink, tune_garbage_collector
from app.sink import PipelinedWriter, WriteFence
from app.topics import sync_events


async def sync(stream: StreamT) -> None:
    consumer = app.consumer
    lane = consumer.lanes[settings.sync_topic]

    def fence_for(events: Sequence[Delivery]) -> WriteFence:
        # A taken batch is of one generation (the lane drops older messages when it hands them out).
        generation = events[0].message.generation_id
        return lambda: lane.writing(generation)

    writer = PipelinedWriter(sink(), consumer.ack_batch, fence_for)
    try:
        while True:
            events = await lane.take(settings.sink_batch_max_events, settings.sink_batch_within_s)
            if events:
                await writer.submit(events)
    finally:
        await writer.close()


# ENABLE_REALTIME_SYNC=false: no agent subscribes to the sync topic (its offsets stay where they are);
# reconciliation and retention still run.
if settings.enable_realtime_sync:
    app.agent(sync_events, name="sync")(sync)


@app.task
async def tune_gc() -> None:
    tune_garbage_collector()


@app.task
async def prepare_history() -> None:
    """Create the history table at start (idempotent); waits, like the sink, while ClickHouse is down."""
    await sink().ensure_schema()


__all__ = ["history", "sync"]
