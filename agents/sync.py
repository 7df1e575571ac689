"""The real-time path: memory.sync.events → ClickHouse history, one batch at a time.

`noack_take` because `take()` acks a batch even when the write fails (faust-streaming notes §3).
Order per batch: write ClickHouse (retrying while it is unavailable), mark the ids in the idempotency
table, route record-level failures, and only then ack.
"""

from __future__ import annotations

from faust import StreamT

from app import app, settings
from app.runtime import history, sink
from app.topics import sync_events


@app.agent(sync_events, name="sync")
async def sync(stream: StreamT) -> None:
    batches = stream.noack().noack_take(settings.sink_batch_max_events, within=settings.sink_batch_within_s)
    async for events in batches:
        await sink().handle(events)
        for event in events:
            await stream.ack(event)


@app.task
async def prepare_history() -> None:
    """Create the history table at start (idempotent); waits, like the sink, while ClickHouse is down."""
    await sink().ensure_schema()


__all__ = ["history", "sync"]
