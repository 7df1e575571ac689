"""Batch reconciliation: the history rows ClickHouse lacks for the documents MongoDB holds.

For each collection, the documents whose `updated_at` falls in the run's window are read in
(`updated_at`, `_id`) order, `BATCH_SIZE` per page, and turned into the history row the real-time path
gives that document version (same `event_id`, operation, timestamp and byte-identical `data`). One
`existing_event_ids` query per page finds the rows ClickHouse already has; the others are inserted
with `source='batch'`.

Reading: one server cursor per collection (pages are its batches), so a page costs one getMore rather
than one query; a resumed run restarts the cursor after its checkpoint with a keyset filter, never with
skip. The next page is fetched while the current one is checked and written.

Checkpoints and drift reports live in MongoDB (`_memsync_runs`, next to the data they describe), one
document per run: the window, and per collection the last (`updated_at`, `_id`) whose rows are all in
ClickHouse plus the counters up to that point. A run that stops (crash, cancellation, ClickHouse away)
continues from there when started again under the same run id. See docs/reconciliation.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bson import Int64, ObjectId
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from app import docjson, metrics
from app.history import AsyncHistory, HistoryRow, RowsRejected, SinkUnavailable, row_problem
from app.identity import (
    DATA_TYPE_FIELD,
    UPDATED_AT_FIELD,
    VERSION_FIELD,
    entity_id_of,
    epoch_ms,
    event_id_for,
    operation_for,
)
from app.settings import Settings
from app.sink import dedup_token

log = logging.getLogger(__name__)

T = TypeVar("T")

JOB = "reconcile"
RUNS_COLLECTION = "_memsync_runs"
SORT = [(UPDATED_AT_FIELD, ASCENDING), ("_id", ASCENDING)]
INDEX_NAME = "memsync_updated_at_id"
# Examples of failed documents kept per collection in a report (the counters stay exact).
MAX_FAILURE_EXAMPLES = 20
# A job gives up on an unavailable ClickHouse after this many attempts (about a minute with the default
# backoff cap); the run keeps its checkpoint and continues when it is requested again.
SINK_ATTEMPTS = 6
# How long a cancelled run waits for its in-flight insert to land, so that whoever resumes the run
# sees those rows instead of inserting them a second time.
LANDING_TIMEOUT_S = 30.0
RUN_HISTORY_DAYS = 90

# BSON type aliases for `$type`, by the Python type pymongo decodes `_id` into.
_TYPE_ALIASES: dict[type, str] = {
    str: "string",
    ObjectId: "objectId",
    int: "number",
    Int64: "number",
    float: "number",
    datetime: "date",
    bool: "bool",
    dict: "object",
}

ProgressCallback = Callable[[str, int], None]


class DocumentProblem(ValueError):
    """This document cannot become a history row (missing or invalid managed field, too large)."""


class Superseded(RuntimeError):
    """Another attempt of this run has started since this copy opened it (a new owner after a stop
    that timed out, or a second `--resume`): this copy must stop writing and leave the run to it."""


# ------------------------------------------------------------------ windows and reports


def utc(moment: datetime) -> datetime:
    """Aware UTC; a naive datetime (as pymongo returns them) is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else utc(moment).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Window:
    """Documents with since <= updated_at < until."""

    since: datetime
    until: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", utc(self.since))
        object.__setattr__(self, "until", utc(self.until))
        if self.since >= self.until:
            raise ValueError(f"empty window: since {iso(self.since)} is not before until {iso(self.until)}")

    @classmethod
    def scheduled(cls, scheduled_for: datetime, lookback_hours: int) -> Window:
        """The window of a scheduled run: the look-back period ending at the scheduled time.

        A pure function of the run, so a resumed run reads exactly what it started reading, and
        consecutive daily runs with a 24 h look-back tile time without gaps or overlap.
        """
        return cls(scheduled_for - timedelta(hours=lookback_hours), scheduled_for)

    def filter(self) -> dict[str, Any]:
        return {UPDATED_AT_FIELD: {"$gte": self.since, "$lt": self.until}}


@dataclass
class CollectionProgress:
    """One collection of a run. Counters cover the documents up to `last_key`, or all when `done`."""

    collection: str
    scanned: int = 0
    present: int = 0
    repaired: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    done: bool = False
    last_updated_at: datetime | None = None
    last_id: Any = None

    @property
    def has_checkpoint(self) -> bool:
        return self.last_updated_at is not None

    def fail(self, entity_id: str, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURE_EXAMPLES:
            self.failures.append({"entity_id": entity_id, "reason": reason[:300]})

    def counters(self) -> dict[str, int]:
        return {
            "scanned": self.scanned,
            "present": self.present,
            "repaired": self.repaired,
            "failed": self.failed,
        }

    def to_doc(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            **self.counters(),
            "failures": self.failures,
            "done": self.done,
            "last_updated_at": self.last_updated_at,
            "last_id": self.last_id,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CollectionProgress:
        return cls(
            collection=doc["collection"],
            scanned=int(doc.get("scanned", 0)),
            present=int(doc.get("present", 0)),
            repaired=int(doc.get("repaired", 0)),
            failed=int(doc.get("failed", 0)),
            failures=list(doc.get("failures", [])),
            done=bool(doc.get("done", False)),
            last_updated_at=doc.get("last_updated_at"),
            last_id=doc.get("last_id"),
        )


@dataclass
class DriftReport:
    """What one reconciliation run found and did, per collection."""

    run_id: str
    window: Window
    collections: list[CollectionProgress]
    trigger: str = "cli"  # cli | schedule
    dry_run: bool = False
    state: str = "running"  # running | done | failed
    attempts: int = 1
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    error: str | None = None
    worker: str = ""

    def totals(self) -> dict[str, int]:
        keys = ("scanned", "present", "repaired", "failed")
        return {key: sum(getattr(p, key) for p in self.collections) for key in keys}

    def summary(self) -> dict[str, Any]:
        """JSON-safe, for the web view, logs and `--json`."""
        return {
            "run_id": self.run_id,
            "state": self.state,
            "dry_run": self.dry_run,
            "window": {"since": iso(self.window.since), "until": iso(self.window.until)},
            "attempts": self.attempts,
            "totals": self.totals(),
            "collections": {
                p.collection: {**p.counters(), "failures": p.failures[:5]} for p in self.collections
            },
            "error": self.error,
        }

    def render(self) -> str:
        """A plain-text table for the CLI."""
        title = f"reconciliation {self.run_id}: {iso(self.window.since)} → {iso(self.window.until)}"
        if self.dry_run:
            title += "  (dry run: 'repaired' counts rows that would be inserted)"
        header = ("collection", "scanned", "present", "repaired", "failed")
        rows = [(p.collection, p.scanned, p.present, p.repaired, p.failed) for p in self.collections]
        totals = self.totals()
        rows.append(("total", totals["scanned"], totals["present"], totals["repaired"], totals["failed"]))
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def line(row: Sequence[object]) -> str:
            cells = [str(row[0]).ljust(widths[0])] + [
                str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            return "  ".join(cells)

        out = [title, line(header), *(line(row) for row in rows)]
        for p in self.collections:
            for failure in p.failures:
                out.append(f"  failed: {p.collection}/{failure['entity_id']}: {failure['reason']}")
            if p.failed > len(p.failures):
                out.append(f"  ... and {p.failed - len(p.failures)} more failures in {p.collection}")
        out.append(f"state: {self.state}" + (f" ({self.error})" if self.error else ""))
        return "\n".join(out)

    def to_doc(self) -> dict[str, Any]:
        return {
            "_id": self.run_id,
            "job": JOB,
            "trigger": self.trigger,
            "since": self.window.since,
            "until": self.window.until,
            "state": self.state,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "worker": self.worker,
            "collections": [p.to_doc() for p in self.collections],
            "totals": self.totals(),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> DriftReport:
        return cls(
            run_id=doc["_id"],
            window=Window(doc["since"], doc["until"]),
            collections=[CollectionProgress.from_doc(c) for c in doc.get("collections", [])],
            trigger=doc.get("trigger", "cli"),
            state=doc.get("state", "running"),
            attempts=int(doc.get("attempts", 1)),
            started_at=utc(doc.get("started_at") or datetime.now(UTC)),
            finished_at=utc(doc["finished_at"]) if doc.get("finished_at") else None,
            error=doc.get("error"),
            worker=doc.get("worker", ""),
        )


# ------------------------------------------------------------------ the run store (MongoDB)


class RunStore:
    """Runs, checkpoints and drift reports in `<MONGODB_DATABASE>._memsync_runs`, one document per run.

    MongoDB rather than ClickHouse: a checkpoint is updated in place once per page, which MongoDB does
    atomically by key (ClickHouse would need a ReplacingMergeTree read with FINAL), and the checkpoint's
    `_id` keeps its BSON type, which the keyset filter of a resumed cursor needs.
    """

    def __init__(self, db: AsyncDatabase) -> None:
        self.runs: AsyncCollection = db[RUNS_COLLECTION]

    async def open(self, report: DriftReport) -> DriftReport:
        """Create the run, or load it (one more attempt) if it exists: then its window and checkpoints
        win over `report`'s."""
        fresh = report.to_doc()
        fresh.pop("attempts")
        existing = await self.runs.find_one_and_update(
            {"_id": report.run_id},
            {
                "$setOnInsert": {k: v for k, v in fresh.items() if k not in ("_id", "worker")},
                "$set": {"worker": report.worker, "resumed_at": datetime.now(UTC)},
                "$inc": {"attempts": 1},
            },
            upsert=True,
            return_document=True,
        )
        loaded = DriftReport.from_doc(existing)
        known = {p.collection for p in loaded.collections}
        loaded.collections += [
            CollectionProgress(c.collection) for c in report.collections if c.collection not in known
        ]
        loaded.dry_run = False
        if loaded.state != "done":
            loaded.state = "running"
            loaded.error = None
        return loaded

    async def save(self, report: DriftReport) -> None:
        """Write the checkpoint and counters; Superseded if a later attempt owns the run."""
        doc = report.to_doc()
        doc.pop("_id")
        doc.pop("attempts")
        result = await self.runs.update_one(
            self._fence(report.run_id, report.attempts), {"$set": {**doc, "updated_at": datetime.now(UTC)}}
        )
        if result.matched_count == 0:
            raise Superseded(f"{report.run_id}: attempt {report.attempts} was superseded by a later attempt")

    async def mark(self, run_id: str, attempt: int, state: str, error: str | None) -> None:
        """Record the outcome only: the counters stay those of the last checkpoint, which they match.
        Superseded if a later attempt owns the run."""
        now = datetime.now(UTC)
        result = await self.runs.update_one(
            self._fence(run_id, attempt),
            {"$set": {"state": state, "error": error, "finished_at": now, "updated_at": now}},
        )
        if result.matched_count == 0:
            raise Superseded(f"{run_id}: attempt {attempt} was superseded by a later attempt")

    @staticmethod
    def _fence(run_id: str, attempt: int) -> dict[str, Any]:
        # Two copies of one run can be alive at once (a stop that timed out leaves the old task running
        # while the new owner opens the run again): only the copy holding the latest attempt may write.
        return {"_id": run_id, "attempts": attempt}

    async def get(self, run_id: str) -> DriftReport | None:
        doc = await self.runs.find_one({"_id": run_id})
        return DriftReport.from_doc(doc) if doc else None

    async def latest_unfinished(self, trigger: str = "cli") -> DriftReport | None:
        doc = await self.runs.find_one(
            {"job": JOB, "trigger": trigger, "state": {"$ne": "done"}}, sort=[("started_at", -1)]
        )
        return DriftReport.from_doc(doc) if doc else None

    async def prune(self, older_than: timedelta = timedelta(days=RUN_HISTORY_DAYS)) -> int:
        result = await self.runs.delete_many({"started_at": {"$lt": datetime.now(UTC) - older_than}})
        return result.deleted_count


# ------------------------------------------------------------------ documents → rows


def row_for(collection: str, document: dict[str, Any], *, max_document_bytes: int) -> HistoryRow:
    """The history row of a document version as read from MongoDB: the real-time path's identity."""
    version = document.get(VERSION_FIELD)
    if type(version) not in (int, Int64) or version < 0:
        raise DocumentProblem(f"field '{VERSION_FIELD}' must be a non-negative integer, got {version!r}")
    updated_at = document.get(UPDATED_AT_FIELD)
    if not isinstance(updated_at, datetime):
        raise DocumentProblem(f"field '{UPDATED_AT_FIELD}' must be a date, got {updated_at!r}")
    data_type = document.get(DATA_TYPE_FIELD)
    if not isinstance(data_type, str) or not data_type:
        raise DocumentProblem(f"field '{DATA_TYPE_FIELD}' must be a non-empty string, got {data_type!r}")
    try:
        data = docjson.encode_checked(document, max_document_bytes)
    except docjson.DocumentTooLarge as exc:
        raise DocumentProblem(str(exc)) from None
    entity_id = entity_id_of(document["_id"])
    row = HistoryRow(
        event_id=event_id_for(collection, entity_id, int(version)),
        entity_id=entity_id,
        data_type=data_type,
        operation=operation_for(int(version)),
        collection=collection,
        event_ts_ms=epoch_ms(updated_at),
        version=int(version),
        data=data,
        metadata=None,
        source="batch",
    )
    problem = row_problem(row)
    if problem:
        raise DocumentProblem(problem)
    return row


def resume_filter(window: Window, last_updated_at: datetime, last_id: Any) -> dict[str, Any]:
    """Documents after (last_updated_at, last_id) in the (updated_at, _id) order, within the window.

    `$gt` on `_id` only compares values of the same BSON type, so documents of the same millisecond
    whose `_id` is of another type are read again (harmless: their rows are found present).
    """
    tie: list[dict[str, Any]] = [{UPDATED_AT_FIELD: last_updated_at, "_id": {"$gt": last_id}}]
    alias = _TYPE_ALIASES.get(type(last_id))
    if alias is None:
        tie = [{UPDATED_AT_FIELD: last_updated_at}]
    else:
        tie.append({UPDATED_AT_FIELD: last_updated_at, "_id": {"$not": {"$type": alias}}})
    after = {"$or": [{UPDATED_AT_FIELD: {"$gt": last_updated_at}}, *tie]}
    return {"$and": [window.filter(), after]}


# ------------------------------------------------------------------ reading


class _Pages:
    """The pages of one cursor, the next one always in flight while the caller works on the current."""

    def __init__(self, cursor: AsyncCursor, batch_size: int) -> None:
        self._cursor = cursor
        self._batch_size = batch_size
        self._next: asyncio.Future[list[dict[str, Any]]] | None = None

    def _fetch(self) -> None:
        self._next = asyncio.ensure_future(self._cursor.to_list(length=self._batch_size))

    def __aiter__(self) -> _Pages:
        return self

    async def __anext__(self) -> list[dict[str, Any]]:
        if self._next is None:
            self._fetch()
        assert self._next is not None
        page = await self._next
        if not page:
            raise StopAsyncIteration
        self._fetch()
        return page

    async def close(self) -> None:
        pending = self._next
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        try:
            await self._cursor.close()
        except Exception:
            log.debug("closing a reconciliation cursor failed", exc_info=True)


# ------------------------------------------------------------------ the run


async def _uninterrupted(awaitable: Awaitable[T]) -> T:
    """Await a write that must not be abandoned half-way: if the caller is cancelled, the write is let
    land (bounded) before the cancellation goes on."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task}, timeout=LANDING_TIMEOUT_S)
        raise


class Reconciler:
    """Runs reconciliation against one database and one history table."""

    def __init__(
        self,
        db: AsyncDatabase,
        history: AsyncHistory,
        *,
        batch_size: int,
        insert_rows: int,
        max_document_bytes: int,
        backoff_max_s: float = 30.0,
        sink_attempts: int = SINK_ATTEMPTS,
        ensure_index: bool = True,
    ) -> None:
        self.db = db
        self.history = history
        self.store = RunStore(db)
        self.batch_size = batch_size
        self.insert_rows = max(insert_rows, batch_size)
        self.max_document_bytes = max_document_bytes
        self.backoff_max_s = backoff_max_s
        self.sink_attempts = sink_attempts
        self.ensure_index = ensure_index

    @classmethod
    def from_settings(cls, settings: Settings, db: AsyncDatabase, history: AsyncHistory) -> Reconciler:
        return cls(
            db,
            history,
            batch_size=settings.batch_size,
            insert_rows=settings.sink_batch_max_events,
            max_document_bytes=settings.max_document_bytes,
            backoff_max_s=settings.sink_backoff_max_s,
        )

    # -------------------------------------------------------------- entry points

    async def run(
        self,
        run_id: str,
        window: Window,
        collections: Sequence[str],
        *,
        trigger: str = "cli",
        dry_run: bool = False,
        worker: str = "",
        progress: ProgressCallback | None = None,
    ) -> DriftReport:
        """Run (or continue) reconciliation `run_id`. A dry run reads and compares only: it writes
        nothing, neither rows nor checkpoints, and always starts from the beginning of the window."""
        report = DriftReport(
            run_id=run_id,
            window=window,
            collections=[CollectionProgress(c) for c in dict.fromkeys(collections)],
            trigger=trigger,
            dry_run=dry_run,
            worker=worker,
        )
        started = time.monotonic()
        if not dry_run:
            # Recorded before anything can fail, so that a failed run can be resumed by its id.
            report = await self.store.open(report)
            if report.state == "done":
                log.info("reconciliation %s is already complete", run_id)
                return report
            await self.store.prune()
        log.info(
            "reconciliation %s: %s → %s, collections %s%s (attempt %d)",
            run_id,
            iso(report.window.since),
            iso(report.window.until),
            ", ".join(p.collection for p in report.collections),
            " (dry run)" if dry_run else "",
            report.attempts,
        )
        try:
            await self._retry_sink(self.history.ensure_schema)
            for item in report.collections:
                if not item.done:
                    await self._collection(report, item, progress)
        except asyncio.CancelledError:
            raise
        except Superseded:
            # The newer attempt owns the run document: record nothing, neither failure nor progress.
            log.warning(
                "reconciliation %s: attempt %d superseded by a later attempt; stopping",
                run_id,
                report.attempts,
            )
            raise
        except Exception as exc:
            report.state = "failed"
            report.error = f"{type(exc).__name__}: {exc}"[:500]
            report.finished_at = datetime.now(UTC)
            if not dry_run:
                await self._save_quietly(report)
            raise
        report.state = "done"
        report.finished_at = datetime.now(UTC)
        if not dry_run:
            await self.store.save(report)
        totals = report.totals()
        log.info(
            "reconciliation %s done in %.1fs: scanned %d, present %d, repaired %d, failed %d",
            run_id,
            time.monotonic() - started,
            totals["scanned"],
            totals["present"],
            totals["repaired"],
            totals["failed"],
        )
        return report

    async def count(self, window: Window, collections: Sequence[str]) -> int:
        """Documents in the window (for progress bars)."""
        total = 0
        for name in collections:
            total += await self.db[name].count_documents(window.filter())
        return total

    # -------------------------------------------------------------- one collection

    async def _collection(
        self, report: DriftReport, item: CollectionProgress, progress: ProgressCallback | None
    ) -> None:
        coll = self.db[item.collection]
        if self.ensure_index and not report.dry_run:
            await self._ensure_index(coll)
        query = (
            resume_filter(report.window, item.last_updated_at, item.last_id)
            if item.has_checkpoint and item.last_updated_at is not None
            else report.window.filter()
        )
        if item.has_checkpoint:
            log.info(
                "reconciliation %s: %s resumes after %s (%d documents done)",
                report.run_id,
                item.collection,
                iso(item.last_updated_at),
                item.scanned,
            )
        pages = _Pages(coll.find(query, sort=SORT, batch_size=self.batch_size), self.batch_size)
        pending: list[HistoryRow] = []
        try:
            async for page in pages:
                # Encoding a page is CPU work (tens of ms): off the event loop the agents share.
                rows = await asyncio.to_thread(self._rows, item, page)
                missing = await self._missing(item, rows)
                last = page[-1]
                if report.dry_run:
                    item.repaired += len(missing)
                else:
                    pending.extend(missing)
                    if len(pending) >= self.insert_rows:
                        await self._flush(item, pending)
                        pending = []
                if not pending:
                    # Every row up to here is in ClickHouse: a safe place to continue from.
                    item.last_updated_at, item.last_id = last[UPDATED_AT_FIELD], last["_id"]
                    if not report.dry_run:
                        await self._uninterrupted_save(report)
                if progress is not None:
                    progress(item.collection, len(page))
            if pending:
                await self._flush(item, pending)
                pending = []
        finally:
            await pages.close()
        item.done = True
        if not report.dry_run:
            await self._uninterrupted_save(report)

    def _rows(self, item: CollectionProgress, page: list[dict[str, Any]]) -> list[HistoryRow]:
        rows: dict[str, HistoryRow] = {}
        for document in page:
            item.scanned += 1
            try:
                row = row_for(item.collection, document, max_document_bytes=self.max_document_bytes)
            except DocumentProblem as exc:
                item.fail(entity_id_of(document.get("_id")), str(exc))
                continue
            except Exception as exc:  # an encoder bug must not stop the other documents
                item.fail(entity_id_of(document.get("_id")), f"{type(exc).__name__}: {exc}")
                continue
            rows.setdefault(row.event_id, row)
        return list(rows.values())

    async def _missing(self, item: CollectionProgress, rows: list[HistoryRow]) -> list[HistoryRow]:
        if not rows:
            return []
        keys = [(row.entity_id, row.event_id) for row in rows]
        present = await self._retry_sink(lambda: self.history.existing_event_ids(keys))
        item.present += len(present)
        return [row for row in rows if row.event_id not in present]

    async def _flush(self, item: CollectionProgress, rows: list[HistoryRow]) -> None:
        rejected = await _uninterrupted(self._insert_isolating(rows))
        for row, reason in rejected:
            item.fail(row.entity_id, f"rejected by ClickHouse: {reason}")
        written = len(rows) - len(rejected)
        item.repaired += written
        if written:
            metrics.reconcile_rows_repaired.labels(item.collection).inc(written)
            metrics.rows_inserted.labels("batch").inc(written)
            metrics.insert_rows.observe(written)

    async def _insert_isolating(self, rows: list[HistoryRow]) -> list[tuple[HistoryRow, str]]:
        """Insert; when ClickHouse refuses values, split until the refused rows are isolated."""
        try:
            await self._retry_sink(lambda: self.history.insert(rows, dedup_token(rows)))
        except RowsRejected as exc:
            if len(rows) == 1:
                return [(rows[0], str(exc))]
            if exc.rows and len(exc.rows) < len(rows):
                refused = set(exc.rows)
                bad = [(rows[i], str(exc)) for i in sorted(refused)]
                rest = [row for i, row in enumerate(rows) if i not in refused]
                return bad + await self._insert_isolating(rest)
            middle = len(rows) // 2
            return await self._insert_isolating(rows[:middle]) + await self._insert_isolating(rows[middle:])
        return []

    async def _ensure_index(self, coll: AsyncCollection) -> None:
        """The (updated_at, _id) index the window query and its sort need: without it every run scans
        and sorts the collection in memory (MongoDB refuses sorts over 100 MB without an index)."""
        try:
            if coll.name not in await self.db.list_collection_names(filter={"name": coll.name}):
                return
            await coll.create_index(SORT, name=INDEX_NAME)
        except OperationFailure as exc:
            log.warning("cannot create index %s on %s (reads will scan): %s", INDEX_NAME, coll.name, exc)

    # -------------------------------------------------------------- plumbing

    async def _uninterrupted_save(self, report: DriftReport) -> None:
        await _uninterrupted(self.store.save(report))

    async def _save_quietly(self, report: DriftReport) -> None:
        try:
            await self.store.mark(report.run_id, report.attempts, report.state, report.error)
        except Superseded:
            raise
        except Exception:
            log.warning("could not record the failure of reconciliation %s", report.run_id, exc_info=True)

    async def _retry_sink(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while ClickHouse is unavailable, a bounded number of times; RowsRejected passes."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SinkUnavailable),
            wait=wait_exponential_jitter(initial=0.5, max=self.backoff_max_s, jitter=0.5),
            stop=stop_after_attempt(self.sink_attempts),
            before_sleep=_log_sink_wait,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover


def _log_sink_wait(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("reconciliation: ClickHouse down (attempt %d), retrying: %s", state.attempt_number, exc)


# ------------------------------------------------------------------ run ids


def scheduled_run_id(scheduled_for: datetime) -> str:
    return f"{JOB}@{utc(scheduled_for):%Y-%m-%dT%H:%MZ}"


def cli_run_id() -> str:
    return f"{JOB}-cli-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


async def scheduled(
    settings: Settings, db: AsyncDatabase, history: AsyncHistory, scheduled_for: datetime
) -> DriftReport:
    """The run the scheduler starts for `scheduled_for` (resumes it when it was interrupted)."""
    reconciler = Reconciler.from_settings(settings, db, history)
    return await reconciler.run(
        scheduled_run_id(scheduled_for),
        Window.scheduled(scheduled_for, settings.sync_lookback_hours),
        settings.sync_collections,
        trigger="schedule",
        worker=settings.worker_id,
    )
