"""Consumer lag per assigned partition, from the broker: high-water mark minus committed offset.

Faust's own end-offset gauge only moves when records arrive, so a stuck partition would look healthy;
this timer asks the broker every LAG_INTERVAL_S for every assigned partition of the sync and retry
topics.

When a refresh fails the lag gauges keep their last values (dropping them would also silence
HighConsumerLag while the broker is unreachable, exactly when lag is likely to grow) and
memory_sync_consumer_lag_refreshed_timestamp_seconds stops moving (it moves only when every assigned
partition got a fresh value): MemorySyncConsumerLagStale alerts on it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, MutableMapping, Set
from typing import Protocol

from faust.types import TP

from app import app, metrics, settings

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
latest: dict[str, dict[int, int]] = {}


class LagSource(Protocol):
    """What the lag refresh needs of a Faust consumer (a fake in tests/unit/test_lag.py)."""

    # Faust records the next offset to consume per partition after each commit, and loads the
    # group's committed offsets from the broker on assignment; None: the group never committed.
    _committed_offset: MutableMapping[TP, int | None]

    def assignment(self) -> Set[TP]: ...

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]: ...

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]: ...


async def refresh_lag(consumer: LagSource | None = None) -> dict[str, dict[int, int]]:
    source: LagSource = consumer if consumer is not None else app.consumer
    topics = {settings.sync_topic, settings.retry_topic}
    assigned = [tp for tp in source.assignment() if tp.topic in topics]
    seen: dict[str, dict[int, int]] = {}
    complete = True
    if assigned:
        highwaters = await source.highwaters(*assigned)
        committed = {tp: source._committed_offset.get(tp) for tp in assigned}
        # A group that never committed starts at the log's start (auto_offset_reset="earliest"), which
        # retention may have moved past 0: counting from 0 would report deleted records as lag.
        uncommitted = [tp for tp, offset in committed.items() if offset is None]
        starts = await source.earliest_offsets(*uncommitted) if uncommitted else {}
        for tp in assigned:
            highwater = highwaters.get(tp)
            if highwater is None:
                # No high-water for it (yet): still assigned, so its last value stays, and this
                # refresh does not count as complete.
                complete = False
                with contextlib.suppress(KeyError):
                    seen.setdefault(tp.topic, {})[tp.partition] = latest[tp.topic][tp.partition]
                continue
            offset = committed[tp]
            start = offset if offset is not None else starts.get(tp, 0)
            lag = max(0, highwater - start)
            seen.setdefault(tp.topic, {})[tp.partition] = lag
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
    # Partitions this worker no longer owns stop being reported by it.
    for topic, partitions in latest.items():
        for partition in partitions:
            if partition not in seen.get(topic, {}):
                with contextlib.suppress(KeyError):
                    metrics.consumer_lag.remove(topic, str(partition))
    latest.clear()
    latest.update(seen)
    if complete:
        metrics.consumer_lag_refreshed.set(time.time())
    return seen


@app.timer(LAG_INTERVAL_S)
async def lag_timer() -> None:
    try:
        await refresh_lag()
    except Exception as exc:  # a timer that raises kills the worker; lag is worth a log line, not that
        log.warning("could not refresh consumer lag: %s", exc)
