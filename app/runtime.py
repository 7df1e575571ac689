"""The worker's long-lived parts, wired once: the history store, the failure lane, the sink."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from app import settings
from app.deadletter import DeadLetters
from app.history import AsyncHistory, HistoryStore
from app.lane import Delivery
from app.sink import HistorySink
from app.topics import dlq_events, retry_events


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
