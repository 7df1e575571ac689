"""The worker's long-lived parts, wired once: the history store, the failure lane, the sink."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from functools import cache

from app import settings
from app.deadletter import DeadLetters
from app.history import AsyncHistory, HistoryStore
from app.lane import Delivery
from app.sink import HistorySink
from app.topics import dlq_events, retry_events

# Python's cyclic collector runs a generation-0 pass every 700 container allocations, and every 10th
# and 100th of those walk the older generations: every live object, the batches in flight included
# (~10^6 objects under load). The real-time path allocates ~10 containers per event, all freed by
# reference counting, so those passes find nothing and cost over a third of the worker's CPU (bench:
# 4.3 of 11.6 CPU-seconds for 400,000 events). Passes every 50,000 allocations, full ones rarer.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """For a worker, once at start: what start-up allocated (modules, the app, its tables) is never
    garbage, so it leaves the collector's generations (gc.freeze), and passes are rarer."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class TableIndex:
    """The idempotency table (tables/processed.py) behind the sink's IdempotencyIndex protocol."""

    def known(self, pairs: Sequence[tuple[Delivery, str]]) -> set[str]:
        from tables import processed

        return processed.known(pairs)

    async def mark(self, pairs: Sequence[tuple[Delivery, str]]) -> None:
        from tables import processed

        await processed.mark(pairs)


@cache
def history() -> AsyncHistory:
    """Opened on first use, so processes that only produce never touch ClickHouse."""
    return AsyncHistory(HistoryStore.open(settings.clickhouse, settings.history_table))


@cache
def dead_letters() -> DeadLetters:
    return DeadLetters(retry_events, dlq_events, settings.worker_id)


@cache
def sink() -> HistorySink:
    return HistorySink(
        history(),
        TableIndex(),
        dead_letters(),
        codec=settings.codec,
        max_document_bytes=settings.max_document_bytes,
        backoff_max_s=settings.sink_backoff_max_s,
        topic=settings.sync_topic,
    )
