"""The scheduler: daily reconciliation and retention, run once per scheduled time across the cluster.

Faust's crontab runs its function inline on every worker, kills the worker when it raises, and with
`on_leader` silently skips a day when a rebalance happens at fire time (faust-streaming notes §6). So:

1. Every worker's crontab only *requests* the run: a (job, scheduled time) message on the control
   topic. So does every worker at start, for every scheduled time of each job within the last
   CATCH_UP_HORIZON (the catch-up of runs missed while no worker was up, or left failed or interrupted
   by a crashed owner; the ones already done are skipped by a table lookup).
2. The control topic has one partition; the worker that owns it runs the `scheduler` agent, which
   decides with the `scheduled-runs` table (tables/schedules.py): a run already done, or running here,
   is skipped; otherwise it is recorded as running and started as a background task. The event is
   acked at once, so a long job never holds the partition's commits or a rebalance.
3. A finished attempt reports back through the control topic (table writes happen only in the agent,
   in the event's context): done, failed (retried later, a bounded number of times) or interrupted.
4. When the worker loses the control partition or stops, its jobs are cancelled (each lets an
   in-flight write land first) and reported interrupted; the new owner continues them from their
   checkpoints. A crashed owner leaves its run `running`: the next request for it (any worker's start
   or the next fire) continues it. A stop that times out may leave the old task running while the
   new owner continues the run: the run store fences checkpoint writes by attempt number, so the old
   copy stops at its next write (`reconcile.Superseded`), logged and not counted as a failure.

Jobs never block the loop (async MongoDB, ClickHouse on executor threads, CPU work in threads) and
never kill the worker: every error is logged, counted (memory_sync_job_failures_total) and shown in
the web view (app.jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter
from faust import StreamT
from faust.types import TP, AppT

from app import app, jobs, reconcile, retention, retention_policies, settings
from app.history import AsyncHistory
from app.mongo import shared_client
from tables.schedules import (
    DONE,
    FAILED,
    FINISHED,
    INTERRUPTED,
    REQUEST,
    RUNNING,
    ControlMessage,
    RunState,
    control_topic,
    run_key,
    scheduled_runs,
)

log = logging.getLogger(__name__)

# A run that failed this many times is left failed (visible in the web view and the table) until an
# operator runs it by hand; earlier failures are retried after these delays.
MAX_FAILURES = 3
RETRY_DELAYS_S = (60.0, 300.0)
# How far back a starting worker requests scheduled runs. Several days, not one: a run that failed or
# was interrupted on an older date (the worker crashed, the retries ran out over a weekend) is retried
# too, not only the latest date. Runs already done cost one table lookup each.
CATCH_UP_HORIZON = timedelta(days=3)
# How often every worker re-reads the last successful runs (CLI runs included) for the stale alert.
LAST_SUCCESS_REFRESH_S = 300.0
# A crontab may wake a little early; the scheduled time is the latest one up to this much later.
FIRE_TOLERANCE = timedelta(seconds=1)
SEND_ATTEMPTS = 5
STOP_TIMEOUT_S = 30.0
HISTORY_CLOSE_TIMEOUT_S = 10.0

Job = Callable[[datetime], Awaitable[dict[str, Any]]]


# ------------------------------------------------------------------ the jobs


@asynccontextmanager
async def _history() -> AsyncIterator[AsyncHistory]:
    """A ClickHouse connection and thread of the job's own: a long mutation wait or a slow page must
    not queue behind (or hold up) the real-time sink's single history thread."""
    history = AsyncHistory.open(settings.clickhouse, settings.history_table)
    try:
        yield history
    finally:
        try:
            await asyncio.wait_for(asyncio.shield(history.close()), HISTORY_CLOSE_TIMEOUT_S)
        except Exception:
            log.warning("closing the job's ClickHouse connection failed", exc_info=True)


async def run_reconcile(scheduled_for: datetime) -> dict[str, Any]:
    async with _history() as history:
        db = shared_client()[settings.mongodb_database]
        report = await reconcile.scheduled(settings, db, history, scheduled_for)
    return report.summary()


async def run_retention(scheduled_for: datetime) -> dict[str, Any]:
    async with _history() as history:
        db = shared_client()[settings.mongodb_database]
        report = await retention.scheduled(settings, retention_policies, db, history, scheduled_for)
    return report.summary()


JOBS: dict[str, Job] = {reconcile.JOB: run_reconcile, retention.JOB: run_retention}
SCHEDULES: dict[str, str] = {
    reconcile.JOB: settings.reconcile_schedule,
    retention.JOB: settings.retention_schedule,
}


def scheduled_time(schedule: str, now: datetime) -> datetime:
    """The latest time of `schedule` at or before `now` (UTC)."""
    prev: datetime = croniter(schedule, now.astimezone(UTC)).get_prev(datetime)
    return prev.astimezone(UTC)


def scheduled_times(schedule: str, now: datetime, horizon: timedelta = CATCH_UP_HORIZON) -> list[datetime]:
    """Every time of `schedule` in (now - horizon, now], oldest first."""
    times: list[datetime] = []
    it = croniter(schedule, now.astimezone(UTC))
    while True:
        moment: datetime = it.get_prev(datetime).astimezone(UTC)
        if now - moment > horizon:
            return times[::-1]
        times.append(moment)


# ------------------------------------------------------------------ requests


async def send(message: ControlMessage) -> bool:
    """Publish a control message and wait for the broker; False (logged) if it could not."""
    delay = 0.5
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            delivery = await control_topic.send(key=message.key.encode(), value=message.encode())
            await asyncio.wait_for(delivery, 30.0)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if attempt == SEND_ATTEMPTS:
                log.error("scheduler: could not send %s for %s: %r", message.kind, message.key, exc)
                return False
            log.warning("scheduler: sending %s for %s failed (%r), retrying", message.kind, message.key, exc)
            await asyncio.sleep(delay)
            delay *= 2
    return False


async def request(job: str, scheduled_for: datetime, reason: str) -> bool:
    message = ControlMessage(REQUEST, job, scheduled_for, settings.worker_id, reason=reason)
    log.info("scheduler: requesting %s (%s)", message.key, reason)
    return await send(message)


async def request_scheduled(job: str) -> None:
    """Body of a crontab: never raises (an exception in a crontab stops the worker)."""
    try:
        now = datetime.now(UTC)
        await request(job, scheduled_time(SCHEDULES[job], now + FIRE_TOLERANCE), "schedule")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("scheduler: requesting the scheduled %s run failed", job)


@app.crontab(settings.reconcile_schedule, timezone=UTC)
async def reconcile_on_schedule() -> None:
    await request_scheduled(reconcile.JOB)


@app.crontab(settings.retention_schedule, timezone=UTC)
async def retention_on_schedule() -> None:
    await request_scheduled(retention.JOB)


@app.task
async def catch_up() -> None:
    """At start: request every scheduled run of each job within CATCH_UP_HORIZON. Runs already done
    are skipped by the scheduler, so every worker may ask."""
    try:
        now = datetime.now(UTC)
        for job, schedule in SCHEDULES.items():
            for moment in scheduled_times(schedule, now):
                await request(job, moment, "catch-up at start")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("scheduler: catch-up requests failed; the next scheduled time will run as usual")


@app.task
async def restore_last_success() -> None:
    """At start: the last-success gauge from the run store, so a restart does not reset the
    reconciliation-stale alert's input and a `sync-batch` run counts as a success."""
    await jobs.refresh_last_success()


@app.timer(LAST_SUCCESS_REFRESH_S)
async def refresh_last_success() -> None:
    # Picks up `sync-batch` runs finished while this worker is up (refresh_last_success never raises).
    await jobs.refresh_last_success()


# ------------------------------------------------------------------ running jobs


class JobRunner:
    """The background tasks of the jobs this worker runs, and their delayed retries.

    One run of a job at a time: the catch-up requests several dates at once, and concurrent runs of
    one job would only compete for the same servers (retention's mutations on the same data types).
    A run waiting for its turn is `running` in the table, and started in request order (oldest first).
    """

    def __init__(self, jobs_by_name: dict[str, Job]) -> None:
        self.jobs = jobs_by_name
        self.active: dict[str, asyncio.Task[None]] = {}
        self.retries: set[asyncio.Task[None]] = set()
        self.turns: dict[str, asyncio.Lock] = {}

    def start(self, key: str, job: str, scheduled_for: datetime, attempt: int) -> None:
        task = asyncio.ensure_future(self._run(key, job, scheduled_for, attempt))
        self.active[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self.active.get(key) is done:
                del self.active[key]

        task.add_done_callback(forget)

    async def _run(self, key: str, job: str, scheduled_for: datetime, attempt: int) -> None:
        turn = self.turns.setdefault(job, asyncio.Lock())
        try:
            if turn.locked():
                log.info("scheduler: %s waits for the %s run in progress", key, job)
            async with turn:
                jobs.started(job, scheduled_for.isoformat(), run=key, attempt=attempt)
                log.info("scheduler: %s started (attempt %d)", key, attempt)
                summary = await self.jobs[job](scheduled_for)
        except asyncio.CancelledError:
            jobs.interrupted(job, "cancelled: control partition revoked or worker stopping")
            log.warning("scheduler: %s interrupted; it continues from its checkpoint", key)
            await self._report(key, job, scheduled_for, attempt, INTERRUPTED, "interrupted")
            raise
        except reconcile.Superseded as exc:
            # Not a failure: a newer attempt (another owner, after this copy's stop timed out) has the
            # run. No report either: the table tracks that attempt, and would ignore this one's.
            jobs.interrupted(job, f"superseded: {exc}")
            log.warning("scheduler: %s attempt %d stopped: a later attempt owns the run", key, attempt)
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("scheduler: %s failed: %s", key, error, exc_info=True)
            jobs.failed(job, error)
            await self._report(key, job, scheduled_for, attempt, FAILED, error)
            return
        jobs.finished(job, summary)
        await jobs.refresh_last_success()
        log.info("scheduler: %s done", key)
        await self._report(key, job, scheduled_for, attempt, DONE, None)

    async def _report(
        self, key: str, job: str, scheduled_for: datetime, attempt: int, outcome: str, error: str | None
    ) -> None:
        message = ControlMessage(
            FINISHED, job, scheduled_for, settings.worker_id, attempt=attempt, outcome=outcome, error=error
        )
        # Cancelled again while reporting: the run stays `running` in the table, and the next request
        # for it continues it.
        with contextlib.suppress(asyncio.CancelledError):
            await send(message)

    def retry_later(self, job: str, scheduled_for: datetime, delay_s: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay_s)
            await request(job, scheduled_for, f"retry after {delay_s:.0f}s")

        task = asyncio.ensure_future(later())
        self.retries.add(task)
        task.add_done_callback(self.retries.discard)

    async def stop(self, reason: str, *, retries: bool = False) -> None:
        tasks = list(self.active.values()) + (list(self.retries) if retries else [])
        if not tasks:
            return
        log.info("scheduler: cancelling %d job task(s): %s", len(tasks), reason)
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        if pending:
            log.warning("scheduler: %d job task(s) did not stop within %.0fs", len(pending), STOP_TIMEOUT_S)


runner = JobRunner(JOBS)


@app.on_partitions_revoked.connect
async def _on_revoked(sender: AppT, revoked: set[TP], **kwargs: Any) -> None:
    if any(tp.topic == control_topic.get_topic_name() for tp in revoked):
        await runner.stop("control partition revoked")


@app.on_before_shutdown.connect
async def _on_shutdown(sender: AppT, **kwargs: Any) -> None:
    await runner.stop("worker stopping", retries=True)


# ------------------------------------------------------------------ the agent


def _state(message: ControlMessage, status: str, attempts: int, failures: int, error: str | None) -> RunState:
    return RunState(
        job=message.job,
        scheduled_for=message.scheduled_for.astimezone(UTC).isoformat(),
        status=status,
        attempts=attempts,
        failures=failures,
        worker=settings.worker_id,
        updated_at=time.time(),
        error=error,
    )


def _decide(key: str, decision: str, detail: str) -> None:
    log.info("scheduler: %s: %s%s", key, decision, f": {detail}" if detail else "")
    jobs.decided(key, decision, detail)


def _start(message: ControlMessage, state: RunState | None, why: str) -> None:
    attempts = (state.attempts if state else 0) + 1
    failures = state.failures if state else 0
    scheduled_runs[message.key] = _state(message, RUNNING, attempts, failures, None)
    _decide(message.key, "started", f"attempt {attempts}: {why}")
    runner.start(message.key, message.job, message.scheduled_for, attempts)


def on_request(message: ControlMessage) -> None:
    key = message.key
    state: RunState | None = scheduled_runs.get(key)
    if key in runner.active:
        _decide(key, "skipped", f"already running on this worker (request: {message.reason})")
    elif state is not None and state.status == DONE:
        _decide(key, "skipped", f"already done (request: {message.reason})")
    elif state is not None and state.status == FAILED and state.failures >= MAX_FAILURES:
        _decide(key, "skipped", f"gave up after {state.failures} failures; run it by hand")
    else:
        why = message.reason if state is None else f"{message.reason}; was {state.status} on {state.worker}"
        _start(message, state, why)


def on_finished(message: ControlMessage) -> None:
    key = message.key
    state: RunState | None = scheduled_runs.get(key)
    if state is None or message.attempt != state.attempts:
        current = state.attempts if state else None
        _decide(key, "ignored", f"report of attempt {message.attempt}, current attempt {current}")
        return
    failures = state.failures + (1 if message.outcome == FAILED else 0)
    scheduled_runs[key] = _state(message, message.outcome, state.attempts, failures, message.error)
    _decide(key, message.outcome, message.error or "")
    if message.outcome == INTERRUPTED and key not in runner.active and not app.should_stop:
        _start(message, scheduled_runs[key], "continuing after an interruption")
    elif message.outcome == FAILED and failures < MAX_FAILURES:
        runner.retry_later(
            message.job, message.scheduled_for, RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S)) - 1]
        )


@app.agent(control_topic, name="scheduler")
async def scheduler(stream: StreamT) -> None:
    async for event in stream.events():
        try:
            message = ControlMessage.decode(event.value)
        except ValueError as exc:
            log.warning("control topic: skipping offset %s: %s", event.message.offset, exc)
            continue
        if message.job not in JOBS:
            log.warning("control topic: skipping %s for unknown job %r", message.kind, message.job)
            continue
        try:
            if message.kind == REQUEST:
                on_request(message)
            else:
                on_finished(message)
        except Exception:
            # An exception would restart the agent and skip this event anyway; say so loudly instead.
            log.exception("scheduler: handling %s for %s failed", message.kind, message.key)


__all__ = [
    "CATCH_UP_HORIZON",
    "JOBS",
    "SCHEDULES",
    "JobRunner",
    "run_key",
    "runner",
    "scheduled_time",
    "scheduled_times",
    "scheduler",
]
