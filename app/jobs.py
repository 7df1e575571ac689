"""Reports of the scheduled jobs (reconciliation, retention) for the web view and metrics.

Two sources:
- in memory, the runs this worker started (the latest of each job, its recent runs, the scheduler's
  decisions): only the worker that owns the control topic's partition runs jobs (agents/scheduler.py);
- in MongoDB (`_memsync_runs`), every run's report, whoever ran it: scheduled runs of any worker and
  `sync-batch` runs from the CLI, across restarts. The web view shows the last finished ones
  (`finished_runs`), and the last-success gauge is set from them (`refresh_last_success`), so neither
  depends on this process having run the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any

from app import metrics
from app.reconcile import JOB as RECONCILE
from app.reconcile import RUNS_COLLECTION, iso, utc
from app.retention import JOB as RETENTION

if TYPE_CHECKING:
    from pymongo.asynchronous.database import AsyncDatabase

log = logging.getLogger(__name__)

SCHEDULED_JOBS = (RECONCILE, RETENTION)

# The worker (scheduler, web views) creates the failure counters at 0 when it starts, so the first
# failure is an increase Prometheus can see: a labelled series that first appears at 1 is invisible to
# increase() (MemorySyncReconciliationFailing). Not the last-success gauge: a 0 there would read as
# "last success in 1970" and fire MemorySyncReconciliationStale on every new worker. Producer
# processes (app.producer) do not import this module and export no job series.
for _job in SCHEDULED_JOBS:
    metrics.job_failures.labels(_job)

RECENT_RUNS = 10
RECENT_DECISIONS = 50
RECENT_FIELDS = ("run", "status", "attempt", "started_at", "finished_at", "error")
# Finished runs the web view reads from `_memsync_runs`, and how long one read serves: a dashboard
# refreshing every few seconds costs one small query per period, not one per request.
RUNS_SHOWN = 10
RUNS_CACHE_S = 5.0
# A slow or unreachable MongoDB must not hold the stats page for the client's server-selection timeout.
RUNS_READ_TIMEOUT_S = 3.0
FINISHED_STATES = ("done", "failed")
COLLECTION_COUNTS = ("scanned", "present", "repaired", "failed")

reports: dict[str, dict[str, Any]] = {}
recent: dict[str, deque[dict[str, Any]]] = {}
decisions: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)


def started(job: str, scheduled_for: str, *, run: str | None = None, attempt: int = 1) -> None:
    reports[job] = {
        "status": "running",
        "scheduled_for": scheduled_for,
        "run": run,
        "attempt": attempt,
        "started_at": time.time(),
    }


def finished(job: str, summary: dict[str, Any]) -> None:
    """The last-success gauge is not set here but from the run store (refresh_last_success), which
    the caller does next: a run that was already done reports success without succeeding now."""
    report = reports.setdefault(job, {"started_at": time.time()})
    report.update(status="ok", finished_at=time.time(), summary=summary)
    metrics.job_duration.labels(job).set(report["finished_at"] - report["started_at"])
    _remember(job, report)
    forget_runs()


def failed(job: str, error: str) -> None:
    report = reports.setdefault(job, {"started_at": time.time()})
    report.update(status="failed", finished_at=time.time(), error=error[:500])
    metrics.job_failures.labels(job).inc()
    metrics.job_duration.labels(job).set(report["finished_at"] - report["started_at"])
    _remember(job, report)
    forget_runs()


def interrupted(job: str, reason: str) -> None:
    """Cancelled (rebalance or shutdown): not a failure; the run continues from its checkpoint."""
    report = reports.setdefault(job, {"started_at": time.time()})
    report.update(status="interrupted", finished_at=time.time(), error=reason[:500])
    _remember(job, report)


def decided(run: str, decision: str, detail: str = "") -> None:
    """What the scheduler did with a control message (started, skipped and why, recorded)."""
    decisions.append({"at": time.time(), "run": run, "decision": decision, "detail": detail[:300]})


def _remember(job: str, report: dict[str, Any]) -> None:
    summary = report.get("summary") or {}
    entry = {key: report.get(key) for key in RECENT_FIELDS}
    entry["totals"] = summary.get("totals")
    recent.setdefault(job, deque(maxlen=RECENT_RUNS)).append(entry)


def job_reports() -> dict[str, dict[str, Any]]:
    return {job: {**report, "recent": list(recent.get(job, ()))} for job, report in reports.items()}


def scheduler_decisions() -> list[dict[str, Any]]:
    return list(decisions)


# ------------------------------------------------------------------ the durable store


def _timestamp(moment: datetime | None) -> float | None:
    return None if moment is None else utc(moment).timestamp()


def run_view(doc: dict[str, Any]) -> dict[str, Any]:
    """A run document of `_memsync_runs` (reconciliation or retention) as the web view shows it."""
    run_id = str(doc.get("_id", ""))
    trigger = doc.get("trigger", "cli")
    view: dict[str, Any] = {
        "run": run_id,
        "job": doc.get("job"),
        # Scheduled run ids end with their scheduled time (`job@2024-05-01T02:00Z`).
        "scheduled_for": (run_id.partition("@")[2] or None) if trigger == "schedule" else "manual",
        "state": doc.get("state"),
        "attempts": doc.get("attempts"),
        "worker": doc.get("worker"),
        "started_at": iso(doc.get("started_at")),
        "finished_at": iso(doc.get("finished_at")),
        "error": doc.get("error"),
    }
    if doc.get("job") == RECONCILE:
        view["window"] = {"since": iso(doc.get("since")), "until": iso(doc.get("until"))}
        view["collections"] = {
            c.get("collection", "?"): {key: int(c.get(key, 0)) for key in COLLECTION_COUNTS}
            for c in doc.get("collections", [])
        }
        view["totals"] = doc.get("totals")
    else:
        report = doc.get("report") or {}
        view["data_types"] = {
            name: {
                "partitions_dropped": len(item.get("partitions_dropped") or []),
                "rows_removed": item.get("rows_removed", 0),
                "documents_deleted": sum((item.get("documents_deleted") or {}).values()),
            }
            for name, item in (report.get("data_types") or {}).items()
        }
        view["totals"] = report.get("totals")
    return view


_runs_cache: tuple[float, dict[str, Any]] | None = None


def forget_runs() -> None:
    """A run just ended here: the next view reads the store again instead of the cached list."""
    global _runs_cache
    _runs_cache = None


async def read_finished_runs(db: AsyncDatabase, limit: int = RUNS_SHOWN) -> list[dict[str, Any]]:
    cursor = db[RUNS_COLLECTION].find(
        {"state": {"$in": list(FINISHED_STATES)}}, sort=[("finished_at", -1)], limit=limit
    )
    return [run_view(doc) async for doc in cursor]


async def finished_runs(db: AsyncDatabase | None = None) -> dict[str, Any]:
    """The last RUNS_SHOWN finished runs of the store, newest first, cached for RUNS_CACHE_S.

    Never raises: a failed read returns the previous list (if any) with the error, so the stats page
    stays up while MongoDB is away.
    """
    global _runs_cache
    now = time.monotonic()
    if _runs_cache is not None and now - _runs_cache[0] < RUNS_CACHE_S:
        return _runs_cache[1]
    try:
        runs = await asyncio.wait_for(read_finished_runs(db or _database()), RUNS_READ_TIMEOUT_S)
    except Exception as exc:
        previous = _runs_cache[1]["recent"] if _runs_cache else []
        return {"recent": previous, "error": f"{type(exc).__name__}: {exc}"[:300]}
    result: dict[str, Any] = {"recent": runs, "error": None}
    _runs_cache = (now, result)
    return result


async def latest_success(db: AsyncDatabase, job: str) -> float | None:
    """Unix time the latest successful run of `job` finished, CLI runs included."""
    doc = await db[RUNS_COLLECTION].find_one(
        {"job": job, "state": "done", "finished_at": {"$ne": None}}, sort=[("finished_at", -1)]
    )
    return _timestamp(doc.get("finished_at")) if doc else None


_last_success: dict[str, float] = {}


async def refresh_last_success(db: AsyncDatabase | None = None) -> dict[str, float]:
    """Set memory_sync_job_last_success_timestamp_seconds from the run store (at start, after a run,
    periodically), so a restart does not lose it and a `sync-batch` run counts. The gauge only moves
    forward, and stays unset while the store knows no success (a 0 would read as "stale since 1970").
    Never raises (it runs in tasks and timers, where an exception stops the worker)."""
    try:
        database = db or _database()
        for job in SCHEDULED_JOBS:
            finished_at = await asyncio.wait_for(latest_success(database, job), RUNS_READ_TIMEOUT_S * 2)
            if finished_at is not None and finished_at > _last_success.get(job, 0.0):
                _last_success[job] = finished_at
                metrics.job_last_success.labels(job).set(finished_at)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("could not read the last successful runs from %s: %r", RUNS_COLLECTION, exc)
    return dict(_last_success)


def _database() -> AsyncDatabase:
    from app import settings
    from app.mongo import shared_client

    return shared_client()[settings.mongodb_database]
