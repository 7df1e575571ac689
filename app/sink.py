"""The real-time path's work, as plain functions the agents call: decode a batch of Kafka events, skip
what is already written, insert the rest into ClickHouse, mark them, and hand failures to the DLQ lane.

Two kinds of failure, two behaviours:
- record-level (this record is bad): routed away (`deadletter`), the partition keeps flowing;
- sink-level (ClickHouse unavailable): the same batch is retried with capped, jittered exponential
  backoff until it is written. Nothing is acked meanwhile, nothing goes to the DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_exponential_jitter,
)

from app import metrics
from app.codecs import EventDecodeError, decode_avro, decode_json
from app.history import AsyncHistory, HistoryRow, RowsRejected, SinkUnavailable
from app.lane import Delivery, StaleBatch

log = logging.getLogger(__name__)

REPLAY_HEADER = "memsync.replay"

# Entered around each insert attempt of a batch; may refuse with StaleBatch (app/lane.py).
WriteFence = Callable[[], AbstractAsyncContextManager[None]]


@dataclass(frozen=True, slots=True)
class Failure:
    """A record-level failure. `retryable` is False when retrying cannot help (undecodable bytes)."""

    event: Delivery
    error_class: str
    message: str
    retryable: bool


@dataclass(slots=True)
class Decoded:
    event: Delivery
    row: HistoryRow


@dataclass
class SinkState:
    """What the health and stats views report about the ClickHouse sink."""

    waiting: bool = False
    reason: str = ""
    since: float | None = None
    attempts: int = 0
    last_insert_at: float | None = None
    last_insert_rows: int = 0

    def wait(self, reason: str) -> None:
        if not self.waiting:
            self.since = time.time()
        self.waiting = True
        self.reason = reason
        self.attempts += 1
        metrics.sink_waiting.set(1)

    def recovered(self, rows: int) -> None:
        if self.waiting:
            log.warning("ClickHouse is back after %.1fs; batch written", time.time() - (self.since or 0))
        self.waiting = False
        self.reason = ""
        self.since = None
        self.attempts = 0
        self.last_insert_at = time.time()
        self.last_insert_rows = rows
        metrics.sink_waiting.set(0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": "waiting" if self.waiting else "healthy",
            "reason": self.reason,
            "waiting_since": self.since,
            "attempts": self.attempts,
            "last_insert_at": self.last_insert_at,
            "last_insert_rows": self.last_insert_rows,
        }


class IdempotencyIndex(Protocol):
    def known(self, pairs: Sequence[tuple[Delivery, str]]) -> set[str]: ...

    async def mark(self, pairs: Sequence[tuple[Delivery, str]]) -> None: ...


class FailureRoute(Protocol):
    async def route(self, failures: Sequence[Failure]) -> None: ...


@dataclass(slots=True)
class PreparedBatch:
    """A decoded batch waiting to be written (HistorySink.prepare → HistorySink.write)."""

    events: Sequence[Delivery]
    fresh: list[Decoded]  # decoded rows, the first of each event_id
    failures: list[Failure]
    batch_duplicates: int
    source: str = "realtime"


@dataclass
class BatchReport:
    consumed: int = 0
    written: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


@dataclass(slots=True)
class CheckedBatch:
    """A prepared batch less what the table and ClickHouse held when it was checked."""

    prepared: PreparedBatch
    report: BatchReport
    fresh: list[Decoded]


def _version_of(document: dict[str, Any]) -> int:
    version = document.get("version", 0)
    if isinstance(version, dict):  # canonical Extended JSON: {"$numberInt": "3"} / {"$numberLong": "3"}
        version = next(iter(version.values()), 0)
    try:
        number = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"document field 'version' is not an integer: {version!r}") from None
    if number < 0:
        raise ValueError(f"document field 'version' is negative: {number}")
    return number


def decode_batch(
    events: Sequence[Delivery], *, codec: str, max_document_bytes: int, source: str = "realtime"
) -> tuple[list[Decoded], list[Failure]]:
    """Turn Kafka events into history rows; every event becomes exactly one row or one failure."""
    decoded: list[Decoded] = []
    failures: list[Failure] = []
    decode = decode_avro if codec == "avro" else decode_json
    for event in events:
        message = event.message
        try:
            value = message.value
            if value is None:
                raise EventDecodeError("empty message (tombstone)")
            payload = decode(value)
        except EventDecodeError as exc:
            failures.append(Failure(event, "undecodable", str(exc), retryable=False))
            continue
        data = payload["data"]
        if len(data) > max_document_bytes:
            failures.append(
                Failure(event, "too_large", f"data is {len(data)} bytes, over {max_document_bytes}", True)
            )
            continue
        try:
            document = orjson.loads(data)
            if not isinstance(document, dict):
                raise ValueError("data must be a JSON object")
            version = _version_of(document)
        except (orjson.JSONDecodeError, ValueError) as exc:
            failures.append(Failure(event, "invalid_data", f"invalid document JSON: {exc}", retryable=True))
            continue
        headers = message.headers
        replayed = bool(headers) and any(key == REPLAY_HEADER for key, _ in _header_items(headers))
        decoded.append(
            Decoded(
                event,
                HistoryRow(
                    payload["event_id"],
                    payload["entity_id"],
                    payload["data_type"],
                    payload["operation"],
                    payload["collection"],
                    payload["timestamp"],
                    version,
                    data,
                    payload["metadata"],
                    "replay" if replayed else source,
                ),
            )
        )
    return decoded, failures


def _header_items(headers: Any) -> list[tuple[str, bytes]]:
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def _first_of_each_event_id(decoded: list[Decoded]) -> list[Decoded]:
    """Within a batch, keep the first of each event_id (later copies are acked as duplicates)."""
    seen: set[str] = set()
    unique: list[Decoded] = []
    for d in decoded:
        event_id = d.row.event_id
        if event_id not in seen:
            seen.add(event_id)
            unique.append(d)
    return unique


def dedup_token(rows: Sequence[HistoryRow]) -> str:
    """Same rows → same token, so ClickHouse (where it supports tokens) drops a retried insert."""
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        digest.update(row.event_id.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.batch_phase.labels(name).observe(time.perf_counter() - started)


class HistorySink:
    """Writes batches of events into the history table, exactly once per event_id."""

    def __init__(
        self,
        history: AsyncHistory,
        index: IdempotencyIndex,
        route: FailureRoute,
        *,
        codec: str,
        max_document_bytes: int,
        backoff_max_s: float,
        topic: str,
    ) -> None:
        self.history = history
        self.index = index
        self.route = route
        self.codec = codec
        self.max_document_bytes = max_document_bytes
        self.backoff_max_s = backoff_max_s
        self.topic = topic
        self.state = SinkState()
        self._schema_ready = False

    async def ensure_schema(self) -> None:
        """Create the history table if needed; waits while ClickHouse is unavailable."""
        if not self._schema_ready:
            await self._retry_sink(self.history.ensure_schema)
            self._schema_ready = True

    def prepare(self, events: Sequence[Delivery], source: str = "realtime") -> PreparedBatch:
        """Decode a batch and drop its inner duplicates: CPU only, no state read, so it can run while
        the previous batch is being written (PipelinedWriter)."""
        with _phase("decode"):
            decoded, failures = decode_batch(
                events, codec=self.codec, max_document_bytes=self.max_document_bytes, source=source
            )
        fresh = _first_of_each_event_id(decoded)
        return PreparedBatch(events, fresh, failures, len(decoded) - len(fresh), source)

    async def handle(
        self,
        events: Sequence[Delivery],
        source: str = "realtime",
        topic: str | None = None,
        fence: WriteFence | None = None,
    ) -> BatchReport:
        """Process one batch. Returns only when every event is written, skipped or routed away.

        `fence`: entered around each insert attempt; it may refuse (StaleBatch, app/lane.py)."""
        checked = await self.check(self.prepare(events, source))
        report, _ = await self.commit(checked, topic, fence)
        return report

    async def check(self, prepared: PreparedBatch) -> CheckedBatch:
        """Drop what the idempotency table or ClickHouse already holds (one lookup for the whole batch).
        Reads state, writes none but table marks of ids found in ClickHouse."""
        await self.ensure_schema()
        report = BatchReport(consumed=len(prepared.events))
        self._count_duplicates(report, "batch", prepared.batch_duplicates)
        fresh = await self._skip_already_written(prepared.fresh, report)
        return CheckedBatch(prepared, report, fresh)

    async def commit(
        self,
        checked: CheckedBatch,
        topic: str | None = None,
        fence: WriteFence | None = None,
        written_since_check: frozenset[str] | set[str] = frozenset(),
    ) -> tuple[BatchReport, list[str]]:
        """Insert a checked batch, mark it, route its failures; returns the report and the event ids
        written. `written_since_check`: ids that batches committed after this one's check wrote (the
        check could not see them). Metrics are counted here, so a batch dropped as stale counts nothing."""
        prepared, report = checked.prepared, checked.report
        events = prepared.events
        failures = list(prepared.failures)
        fresh = checked.fresh
        if written_since_check:
            unseen = [d for d in fresh if d.row.event_id not in written_since_check]
            self._count_duplicates(report, "table", len(fresh) - len(unseen))
            fresh = unseen
        written: list[Decoded] = []
        if fresh:
            with _phase("insert"):
                rejected = await self._insert_isolating([d.row for d in fresh], fence)
            rejected_ids = {row.event_id for row, _ in rejected}
            event_of = {d.row.event_id: d.event for d in fresh} if rejected else {}
            for row, exc in rejected:
                failures.append(Failure(event_of[row.event_id], "rejected_by_clickhouse", str(exc), True))
            written = [d for d in fresh if d.row.event_id not in rejected_ids] if rejected else fresh
            with _phase("mark"):
                await self.index.mark([(d.event, d.row.event_id) for d in written])
            report.written = len(written)
            now_ms = time.time() * 1000
            metrics.observe_many(
                metrics.consume_latency, [max(0.0, (now_ms - d.row.event_ts_ms) / 1000) for d in written]
            )
            metrics.rows_inserted.labels(prepared.source).inc(len(written))
        metrics.record_consumed(topic or self.topic, len(events), sync=topic in (None, self.topic))
        for layer, count in report.duplicates.items():
            if count:
                metrics.duplicates_skipped.labels(layer).inc(count)
        if failures:
            report.failures = failures
            with _phase("route"):
                await self.route.route(failures)
        return report, [d.row.event_id for d in written]

    async def _skip_already_written(self, decoded: list[Decoded], report: BatchReport) -> list[Decoded]:
        if not decoded:
            return decoded
        with _phase("table"):
            known = self.index.known([(d.event, d.row.event_id) for d in decoded])
        self._count_duplicates(report, "table", len(known))
        unknown = [d for d in decoded if d.row.event_id not in known] if known else decoded
        if not unknown:
            return unknown
        # One lookup per batch for ids the table does not know: rows written before a crash lost the
        # table update, or written by the batch path.
        with _phase("clickhouse_lookup"):
            in_clickhouse = await self._retry_sink(
                lambda: self.history.existing_event_ids([(d.row.entity_id, d.row.event_id) for d in unknown])
            )
        if in_clickhouse:
            self._count_duplicates(report, "clickhouse", len(in_clickhouse))
            found = [(d.event, d.row.event_id) for d in unknown if d.row.event_id in in_clickhouse]
            await self.index.mark(found)
            return [d for d in unknown if d.row.event_id not in in_clickhouse]
        return unknown

    def _count_duplicates(self, report: BatchReport, layer: str, count: int) -> None:
        if count:
            report.duplicates[layer] = report.duplicates.get(layer, 0) + count

    async def _insert_isolating(
        self, rows: list[HistoryRow], fence: WriteFence | None = None
    ) -> list[tuple[HistoryRow, RowsRejected]]:
        """Insert rows; when ClickHouse rejects a value, bisect to find the rows it rejects."""
        token = dedup_token(rows)

        async def insert() -> None:
            if fence is None:
                await self.history.insert(rows, token)
                return
            async with fence():
                await self.history.insert(rows, token)

        try:
            await self._retry_sink(insert)
        except RowsRejected as exc:
            if exc.rows and len(exc.rows) < len(rows):
                # Validation named the bad rows: route them, write the others.
                bad = set(exc.rows)
                named = [(row, exc) for index, row in enumerate(rows) if index in bad]
                rest = [row for index, row in enumerate(rows) if index not in bad]
                return named + await self._insert_isolating(rest, fence)
            if len(rows) == 1:
                log.warning("ClickHouse rejected event %s: %s", rows[0].event_id, exc)
                return [(rows[0], exc)]
            middle = len(rows) // 2
            first = await self._insert_isolating(rows[:middle], fence)
            return first + await self._insert_isolating(rows[middle:], fence)
        metrics.insert_rows.observe(len(rows))
        self.state.recovered(len(rows))
        return []

    async def _retry_sink(self, call: Any) -> Any:
        """Run `call` until ClickHouse answers; RowsRejected propagates at once."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SinkUnavailable),
            wait=wait_exponential_jitter(initial=0.5, max=self.backoff_max_s, jitter=1.0),
            stop=stop_never,
            before_sleep=self._on_sink_unavailable,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        return None  # pragma: no cover - stop_never

    def _on_sink_unavailable(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        reason = str(exc) if exc else "unknown"
        if not self.state.waiting:
            log.error("ClickHouse unavailable, holding the batch and retrying: %s", reason)
        self.state.wait(reason)
        metrics.sink_retries.inc()


class PipelinedWriter:
    """Writes batches in three overlapping stages, so ClickHouse, Kafka and the event loop work at once:

    1. the agent decodes batch N+2 (`HistorySink.prepare`, CPU only, reads no state);
    2. a checker task looks batch N+1 up in the table and ClickHouse (`HistorySink.check`);
    3. a committer task inserts batch N, marks it and acks it (`HistorySink.commit`), in order.

    A check can run before the batches ahead of it are written; what those batches write meanwhile is
    handed to its commit (`written_since_check`), so an event in two consecutive batches is still
    written once. Queues of one: memory is bounded, and when ClickHouse is slow or down the agent
    stops taking records. `ack` gets each batch once it is written, skipped or routed away.
    """

    def __init__(
        self,
        sink: HistorySink,
        ack: Callable[[Sequence[Delivery]], None],
        fence_for: Callable[[Sequence[Delivery]], WriteFence] | None = None,
    ) -> None:
        self.sink = sink
        self.ack = ack
        self.fence_for = fence_for
        self.prepared: asyncio.Queue[PreparedBatch] = asyncio.Queue(maxsize=1)
        self.checked: asyncio.Queue[tuple[CheckedBatch, int]] = asyncio.Queue(maxsize=1)
        self.tasks: list[asyncio.Task[None]] = []
        self.committed = 0  # batches committed (or dropped) so far
        # (sequence number, ids written) of the last commits; a check is at most 2 commits behind.
        self.recent: deque[tuple[int, list[str]]] = deque(maxlen=4)

    async def submit(self, events: Sequence[Delivery]) -> None:
        if not self.tasks:
            self.tasks = [
                asyncio.create_task(self._check_loop(), name="memsync-batch-checker"),
                asyncio.create_task(self._commit_loop(), name="memsync-batch-committer"),
            ]
        self._raise_if_stopped()
        prepared = self.sink.prepare(events)
        put = asyncio.ensure_future(self.prepared.put(prepared))
        await asyncio.wait({put, *self.tasks}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        for task in self.tasks:
            if task.done():
                task.result()  # re-raises what stopped it
                raise RuntimeError(f"{task.get_name()} stopped")

    async def _check_loop(self) -> None:
        while True:
            prepared = await self.prepared.get()
            committed_before = self.committed
            await self.checked.put((await self.sink.check(prepared), committed_before))

    async def _commit_loop(self) -> None:
        while True:
            checked, committed_before = await self.checked.get()
            events = checked.prepared.events
            written_since: set[str] = set()
            for sequence, ids in self.recent:
                if sequence > committed_before:
                    written_since.update(ids)
            try:
                _, written = await self.sink.commit(
                    checked,
                    fence=self.fence_for(events) if self.fence_for else None,
                    written_since_check=written_since,
                )
            except StaleBatch as exc:
                metrics.stale_batches.inc()
                log.warning(
                    "Dropped a batch of %d events %s; their partitions' owners read them again",
                    len(events), exc,
                )
                written = []
            else:
                self.ack(events)
            self.committed += 1
            self.recent.append((self.committed, written))

    async def close(self) -> None:
        """Stop the writer; batches in hand stay unacked and are redelivered after a restart."""
        for task in self.tasks:
            if task.done():
                if not task.cancelled() and task.exception() is not None:
                    log.error("%s had stopped: %r", task.get_name(), task.exception())
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
