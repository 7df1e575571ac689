"""Reports of the scheduled jobs (reconciliation, retention) run by this worker, for the web view and
metrics: the latest run of each job, its recent runs, and the scheduler's recent decisions.

Only the worker that owns the control topic's partition runs jobs (agents/scheduler.py), so another
worker shows no runs here; every run's report is also kept in MongoDB (`_memsync_runs`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from app import metrics
from app.reconcile import JOB as RECONCILE
from app.retention import JOB as RETENTION

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
    report = reports.setdefault(job, {"started_at": time.time()})
    report.update(status="ok", finished_at=time.time(), summary=summary)
    metrics.job_last_success.labels(job).set(report["finished_at"])
    metrics.job_duration.labels(job).set(report["finished_at"] - report["started_at"])
    _remember(job, report)


def failed(job: str, error: str) -> None:
    report = reports.setdefault(job, {"started_at": time.time()})
    report.update(status="failed", finished_at=time.time(), error=error[:500])
    metrics.job_failures.labels(job).inc()
    metrics.job_duration.labels(job).set(report["finished_at"] - report["started_at"])
    _remember(job, report)


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
