"""The DLQ agent: keeps statistics of dead letters (counts by error class, latest errors, no payload)
for the web view. Replaying is a CLI command (`faust -A app dlq-replay`), not automatic: a dead letter
needs a human decision."""

from __future__ import annotations

from faust import StreamT

from app import app
from app.deadletter import dlq_stats
from app.topics import dlq_events


@app.agent(dlq_events, name="dlq-stats")
async def dlq_agent(stream: StreamT) -> None:
    async for event in stream.events():
        dlq_stats.record(event)
