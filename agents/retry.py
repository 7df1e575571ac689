"""The retry lane: record-level failures come back here after 1 s, 2 s, 4 s, then go to the DLQ.

Only failed records wait here, so the main partitions never stall behind a bad record.
"""

from __future__ import annotations

import asyncio
import time

from faust import StreamT

from app import app, settings
from app.deadletter import H_NOT_BEFORE, headers_of
from app.runtime import sink
from app.topics import retry_events


@app.agent(retry_events, name="retry")
async def retry(stream: StreamT) -> None:
    async for event in stream.noack().events():
        due_ms = int(headers_of(event).get(H_NOT_BEFORE, b"0") or 0)
        delay_s = (due_ms - time.time() * 1000) / 1000
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await sink().handle([event], topic=settings.retry_topic)
        await stream.ack(event)
