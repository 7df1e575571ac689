"""Consumer lag per assigned partition, from the broker: high-water mark minus committed offset.

Faust's own end-offset gauge only moves when records arrive, so a stuck partition would look healthy;
this timer asks the broker every LAG_INTERVAL_S for every assigned partition of the sync topic.
"""

from __future__ import annotations

import contextlib
import logging

from faust.types import TP

from app import app, metrics, settings

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
latest: dict[str, dict[int, int]] = {}


def committed_offset(tp: TP) -> int | None:
    # Faust records the next offset to consume per partition after each commit, and loads the
    # group's committed offsets from the broker on assignment.
    return app.consumer._committed_offset.get(tp)


async def refresh_lag() -> dict[str, dict[int, int]]:
    assigned = [
        tp for tp in app.consumer.assignment() if tp.topic in {settings.sync_topic, settings.retry_topic}
    ]
    seen: dict[str, dict[int, int]] = {}
    if assigned:
        highwaters = await app.consumer.highwaters(*assigned)
        for tp in assigned:
            highwater = highwaters.get(tp)
            if highwater is None:
                continue
            committed = committed_offset(tp) or 0
            lag = max(0, highwater - committed)
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
    return seen


@app.timer(LAG_INTERVAL_S)
async def lag_timer() -> None:
    try:
        await refresh_lag()
    except Exception as exc:  # a timer that raises kills the worker; lag is worth a log line, not that
        log.warning("could not refresh consumer lag: %s", exc)
