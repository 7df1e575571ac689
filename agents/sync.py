"""The real-time path: memory.sync.events → ClickHouse history, one batch at a time.

`noack_take` because `take()` acks a batch even when the write fails (faust-streaming notes §3).
Order per batch: write ClickHouse (retrying while it is unavailable), mark the ids in the idempotency
table, route record-level failures, and only then ack. The writing happens on a writer task
(app.sink.PipelinedWriter) so the next batch is collected meanwhile.
"""

from __future__ import annotations

from faust import StreamT

from app import app, settings
from app.runtime import history, sink
from app.sink import PipelinedWriter
from app.topics import sync_events


async def sync(stream: StreamT) -> None:
    # Each written event sets one table key, i.e. one changelog message in Faust's producer buffer.
    # Faust holds back every incoming message while that buffer has more than `max_messages` (100)
    # pending, which throttled consumption to the changelog's send rate; a batch's worth fits.
    app.producer.buffer.max_messages = 2 * settings.sink_batch_max_events
    batches = stream.noack().noack_take(settings.sink_batch_max_events, within=settings.sink_batch_within_s)
    writer = PipelinedWriter(sink(), stream.ack)
    try:
        async for events in batches:
            await writer.submit(events)
    finally:
        await writer.close()


# ENABLE_REALTIME_SYNC=false: no agent subscribes to the sync topic (its offsets stay where they are);
# reconciliation and retention still run.
if settings.enable_realtime_sync:
    app.agent(sync_events, name="sync")(sync)


@app.task
async def prepare_history() -> None:
    """Create the history table at start (idempotent); waits, like the sink, while ClickHouse is down."""
    await sink().ensure_schema()


__all__ = ["history", "sync"]
