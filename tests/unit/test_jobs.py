"""Scheduler and job-report logic without servers: the catch-up horizon, a superseded copy of a run,
the run store's documents as the web view shows them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from agents import scheduler
from agents.scheduler import CATCH_UP_HORIZON, JobRunner, scheduled_times
from app import jobs, metrics
from app.reconcile import Superseded


def test_catch_up_requests_every_scheduled_time_within_the_horizon():
    now = datetime(2024, 5, 10, 1, 0, tzinfo=UTC)
    assert timedelta(days=3) == CATCH_UP_HORIZON
    # 02:00 today has not come yet: the three previous days' runs, oldest first.
    assert scheduled_times("0 2 * * *", now) == [
        datetime(2024, 5, 7, 2, 0, tzinfo=UTC),
        datetime(2024, 5, 8, 2, 0, tzinfo=UTC),
        datetime(2024, 5, 9, 2, 0, tzinfo=UTC),
    ]
    # Just after 02:00: May 7 02:00 is more than three days ago now.
    assert scheduled_times("0 2 * * *", now.replace(hour=2, minute=1))[0] == datetime(
        2024, 5, 8, 2, 0, tzinfo=UTC
    )
    assert scheduled_times("0 2 * * *", now, timedelta(hours=1)) == []
    assert len(scheduled_times("0 * * * *", now)) == 72


@pytest.fixture
def sent(monkeypatch) -> list:
    messages: list = []

    async def send(message) -> bool:
        messages.append(message)
        return True

    async def no_store(db=None) -> dict:
        return {}

    monkeypatch.setattr(scheduler, "send", send)
    monkeypatch.setattr(jobs, "refresh_last_success", no_store)
    return messages


def failures(job: str) -> float:
    return metrics.job_failures.labels(job)._value.get()


async def test_a_superseded_copy_stops_without_counting_a_failure(sent):
    async def superseded(scheduled_for: datetime) -> dict:
        raise Superseded("reconcile@x: attempt 1 was superseded by a later attempt")

    runner = JobRunner({"reconcile": superseded})
    before = failures("reconcile")
    runner.start("reconcile@x", "reconcile", datetime(2024, 5, 1, 2, tzinfo=UTC), 1)
    await asyncio.wait(set(runner.active.values()))
    assert failures("reconcile") == before
    assert jobs.reports["reconcile"]["status"] == "interrupted"
    assert "superseded" in jobs.reports["reconcile"]["error"]
    # No report either: the table tracks the newer attempt.
    assert sent == []


async def test_a_failing_job_is_counted_and_reported(sent):
    async def boom(scheduled_for: datetime) -> dict:
        raise RuntimeError("boom")

    runner = JobRunner({"reconcile": boom})
    before = failures("reconcile")
    runner.start("reconcile@y", "reconcile", datetime(2024, 5, 1, 2, tzinfo=UTC), 1)
    await asyncio.wait(set(runner.active.values()))
    assert failures("reconcile") == before + 1
    assert [(m.outcome, m.attempt) for m in sent] == [("failed", 1)]


def test_run_documents_as_the_web_view_shows_them():
    finished = datetime(2024, 5, 2, 2, 5, 30)
    scheduled = jobs.run_view(
        {
            "_id": "reconcile@2024-05-02T02:00Z",
            "job": "reconcile",
            "trigger": "schedule",
            "state": "done",
            "attempts": 2,
            "since": datetime(2024, 5, 1, 2),
            "until": datetime(2024, 5, 2, 2),
            "started_at": datetime(2024, 5, 2, 2, 0, 1),
            "finished_at": finished,
            "collections": [
                {"collection": "contexts", "scanned": 10, "present": 7, "repaired": 2, "failed": 1},
                {"collection": "facts", "scanned": 3, "present": 3, "repaired": 0, "failed": 0},
            ],
        }
    )
    assert scheduled["scheduled_for"] == "2024-05-02T02:00Z"
    assert scheduled["finished_at"] == "2024-05-02T02:05:30Z"
    assert scheduled["collections"] == {
        "contexts": {"scanned": 10, "present": 7, "repaired": 2, "failed": 1},
        "facts": {"scanned": 3, "present": 3, "repaired": 0, "failed": 0},
    }
    manual = jobs.run_view(
        {"_id": "reconcile-cli-1", "job": "reconcile", "trigger": "cli", "state": "failed"}
    )
    assert manual["scheduled_for"] == "manual"
    retention = jobs.run_view(
        {
            "_id": "retention@2024-05-02T03:00Z",
            "job": "retention",
            "trigger": "schedule",
            "state": "done",
            "report": {
                "totals": {"rows_removed": 5},
                "data_types": {
                    "context": {
                        "partitions_dropped": ["('context',202401)"],
                        "rows_removed": 5,
                        "documents_deleted": {"contexts": 2, "facts": 1},
                    }
                },
            },
        }
    )
    assert retention["data_types"] == {
        "context": {"partitions_dropped": 1, "rows_removed": 5, "documents_deleted": 3}
    }


def test_the_stats_page_renders_counts_as_tables():
    from app.web import render_runs

    def table(rows: list, header: tuple) -> str:
        return "<table>" + repr(header) + "".join(repr(row) for row in rows) + "</table>"

    run = {
        "run": "reconcile-cli-1",
        "job": "reconcile",
        "scheduled_for": "manual",
        "state": "done",
        "collections": {"contexts": {"scanned": 10, "present": 7, "repaired": 2, "failed": 1}},
    }
    page = render_runs([run], None, table)
    assert "reconcile manual: done" in page
    assert "('collection', 'scanned', 'present', 'repaired', 'failed')" in page
    assert "('contexts', 10, 7, 2, 1)" in page
    assert "{" not in page  # no dict printed as a string
    assert "unreadable: ServerSelectionTimeoutError" in render_runs([], "ServerSelectionTimeoutError", table)


async def test_runs_of_one_job_take_turns_in_request_order(sent):
    running: list[datetime] = []
    order: list[datetime] = []
    overlap = False

    async def job(scheduled_for: datetime) -> dict:
        nonlocal overlap
        overlap = overlap or bool(running)
        running.append(scheduled_for)
        order.append(scheduled_for)
        await asyncio.sleep(0.01)
        running.remove(scheduled_for)
        return {}

    runner = JobRunner({"reconcile": job})
    dates = [datetime(2024, 5, day, 2, tzinfo=UTC) for day in (1, 2, 3)]
    for n, date in enumerate(dates):
        runner.start(f"reconcile@{n}", "reconcile", date, 1)
    await asyncio.wait(set(runner.active.values()))
    assert not overlap
    assert order == dates
    assert [m.outcome for m in sent] == ["done"] * 3
