"""The scheduler with real workers: a missed run is caught up at start, an interrupted one continues
from its checkpoint, each (job, date) runs once however often and by whomever it is requested, and a
failing job leaves the worker running."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer
from croniter import croniter
from pymongo import MongoClient

from app.identity import event_id_for
from app.reconcile import RUNS_COLLECTION
from tables.schedules import REQUEST, ControlMessage, run_key
from tests.worker import Scenario, Worker, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def scenario(stack, unique_name, tmp_path) -> Scenario:
    return Scenario(stack, unique_name, tmp_path, partitions=2)


def last_scheduled(schedule: str) -> datetime:
    return croniter(schedule, datetime.now(UTC)).get_prev(datetime).astimezone(UTC)


def history_counts(scenario: Scenario) -> tuple[int, int]:
    store = scenario.history()
    try:
        ((count, unique),) = store.query(
            f"SELECT count(), uniqExact(event_id) FROM {scenario.settings().history_table}"
        )
        return int(count), int(unique)
    except Exception:  # the table does not exist yet
        return 0, 0
    finally:
        store.close()


def insert_docs(mongo, prefix: str, count: int, updated_at: datetime) -> set[str]:
    docs = [
        {
            "_id": f"{prefix}-{i:05d}",
            "body": "y" * 100,
            "data_type": "context",
            "version": 1,
            "updated_at": (updated_at + timedelta(milliseconds=i)).replace(tzinfo=None),
        }
        for i in range(count)
    ]
    mongo["contexts"].insert_many(docs)
    return {event_id_for("contexts", d["_id"], 1) for d in docs}


def send(scenario: Scenario, *messages: ControlMessage) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=scenario.stack.kafka_bootstrap)
        await producer.start()
        try:
            for message in messages:
                await producer.send_and_wait(
                    scenario.env()["KAFKA_CONTROL_TOPIC"], message.encode(), key=message.key.encode()
                )
        finally:
            await producer.stop()

    asyncio.new_event_loop().run_until_complete(go())


def run_doc(mongo, key: str) -> dict | None:
    return mongo[RUNS_COLLECTION].find_one({"_id": key})


def test_missed_run_is_caught_up_continued_after_a_stop_and_not_repeated(scenario):
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[scenario.settings().mongodb_database]
    last = last_scheduled("0 2 * * *")
    reconcile_key, retention_key = (
        run_key("reconcile", last),
        run_key("retention", last_scheduled("0 3 * * *")),
    )
    # Changed within the window of the run this "cluster" missed (no worker was up at 02:00).
    expected = insert_docs(mongo, "missed", 8000, last - timedelta(hours=3))
    # ... and within the window of the run two days earlier, also missed: the catch-up requests every
    # scheduled time within CATCH_UP_HORIZON (3 days), not only the latest.
    older = last - timedelta(days=2)
    older_key = run_key("reconcile", older)
    older_expected = insert_docs(mongo, "older", 100, older - timedelta(hours=3))
    small_pages = {"BATCH_SIZE": "50", "SINK_BATCH_MAX_EVENTS": "200"}

    # 1. The worker requests the missed run at start; it is stopped (SIGTERM) in the middle of it.
    worker = Worker(scenario, **small_pages).start()
    try:
        wait_for(
            lambda: (
                ((run_doc(mongo, reconcile_key) or {}).get("collections") or [{}])[0].get("scanned", 0)
                >= 1000
            ),
            120,
            "the catch-up run to make progress",
            worker.log,
        )
    finally:
        worker.stop()
    stopped = run_doc(mongo, reconcile_key)
    assert stopped["state"] == "running", "the run finished before the worker could be stopped"
    assert "interrupted; it continues from its checkpoint" in worker.log()
    assert worker.process is not None
    assert worker.process.returncode == 0

    # 2. Restarted, it continues the run from its checkpoint.
    worker = Worker(scenario, **small_pages).start()
    try:
        wait_for(
            lambda: (run_doc(mongo, reconcile_key) or {}).get("state") == "done", 120, "the run", worker.log
        )
        wait_for(
            lambda: (run_doc(mongo, retention_key) or {}).get("state") == "done", 60, "retention", worker.log
        )
        wait_for(
            lambda: (run_doc(mongo, older_key) or {}).get("state") == "done", 60, "the older run", worker.log
        )
    finally:
        worker.stop()
    assert run_doc(mongo, older_key)["totals"]["scanned"] == 100
    assert run_doc(mongo, older_key)["totals"]["repaired"] == 100
    # Three days: the run three days before the latest is out of the horizon (never requested).
    assert run_doc(mongo, run_key("reconcile", last - timedelta(days=3))) is None
    done = run_doc(mongo, reconcile_key)
    assert done["attempts"] == 2
    assert done["totals"]["scanned"] == 8000
    assert done["totals"]["failed"] == 0
    assert done["totals"]["repaired"] + done["totals"]["present"] == 8000
    assert done["totals"]["present"] <= 200 + 50  # only rows written after the last checkpoint
    assert history_counts(scenario) == (8100, 8100)
    store = scenario.history()
    try:
        ids = {row[0] for row in store.query(f"SELECT event_id FROM {scenario.settings().history_table}")}
    finally:
        store.close()
    assert ids == expected | older_expected

    # 3. Started again: both runs are known to be done and are not repeated.
    worker = Worker(scenario, label="w1")
    earlier = len(worker.log())  # the log file is shared with the earlier starts of "w1"
    worker.start()
    try:
        # Three scheduled times of each job in the last three days, all done.
        wait_for(
            lambda: worker.log()[earlier:].count("already done (request: catch-up at start)") >= 6,
            60,
            "the catch-up requests to be skipped",
            worker.log,
        )
    finally:
        worker.stop()
    assert " started (attempt" not in worker.log()[earlier:]
    assert run_doc(mongo, reconcile_key)["attempts"] == 2
    assert run_doc(mongo, older_key)["attempts"] == 1
    assert run_doc(mongo, retention_key)["attempts"] == 1
    assert history_counts(scenario) == (8100, 8100)


def test_a_run_requested_twice_and_by_two_workers_runs_once(scenario):
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[scenario.settings().mongodb_database]
    date = (datetime.now(UTC) - timedelta(days=10)).replace(second=0, microsecond=0)
    key = run_key("reconcile", date)
    expected = insert_docs(mongo, "asked", 300, date - timedelta(hours=2))
    catch_up_key = run_key("reconcile", last_scheduled("0 2 * * *"))

    w1 = Worker(scenario, label="w1").start()
    w2 = Worker(scenario, label="w2").start()
    try:
        # Both workers requested the same catch-up run at start.
        wait_for(lambda: (run_doc(mongo, catch_up_key) or {}).get("state") == "done", 90, "catch-up", w1.log)
        logs = lambda: w1.log() + w2.log()  # noqa: E731
        wait_for(lambda: f"{catch_up_key} started" in logs(), 30, "the catch-up start line", logs)
        # Both workers requested it; whichever owns the control partition ran it, once: one attempt
        # started and one finished across both workers, and the other request was skipped.
        wait_for(
            lambda: logs().count(f"{catch_up_key}: skipped") >= 1,
            60,
            "the second catch-up request to be skipped",
            logs,
        )
        assert logs().count(f"{catch_up_key} started (attempt") == 1
        assert logs().count(f"scheduler: {catch_up_key} done") == 1
        assert run_doc(mongo, catch_up_key)["attempts"] == 1

        request = ControlMessage(REQUEST, "reconcile", date, "test", reason="by hand")
        send(scenario, request, request)
        wait_for(lambda: (run_doc(mongo, key) or {}).get("state") == "done", 90, "the requested run", logs)
        wait_for(
            lambda: f"{key} skipped" in logs() or f"{key}: skipped" in logs(),
            60,
            "the second request to be skipped",
            logs,
        )
        assert run_doc(mongo, key)["attempts"] == 1
        assert logs().count(f"{key} started (attempt") == 1
        assert run_doc(mongo, key)["totals"]["repaired"] == 300

        # A third request, much later, is skipped as done.
        send(scenario, request)
        wait_for(lambda: logs().count(f"{key}: skipped") >= 2, 60, "the third request to be skipped", logs)
        assert run_doc(mongo, key)["attempts"] == 1
        assert w1.alive()
        assert w2.alive()
    finally:
        w2.stop()
        w1.stop()
    assert history_counts(scenario) == (300, 300)
    store = scenario.history()
    try:
        ids = {row[0] for row in store.query(f"SELECT event_id FROM {scenario.settings().history_table}")}
    finally:
        store.close()
    assert ids == expected


def test_a_failing_job_does_not_stop_the_worker(scenario):
    # Nothing listens on this port: every ClickHouse call of both jobs fails.
    worker = Worker(
        scenario,
        CLICKHOUSE_URL=f"clickhouse://default@127.0.0.1:{free_port()}/default",
        SINK_BACKOFF_MAX_SECONDS="0.2",
    ).start()
    try:

        def failed_jobs() -> set[str]:
            import json

            body = worker.get("/stats")
            jobs = json.loads(body)["jobs"] if body else {}
            return {name for name, report in jobs.items() if report.get("status") == "failed"}

        wait_for(lambda: failed_jobs() == {"reconcile", "retention"}, 90, "both jobs to fail", worker.log)
        assert worker.metric("memory_sync_job_failures_total", {"job_name": "reconcile"}) >= 1
        assert worker.metric("memory_sync_job_failures_total", {"job_name": "retention"}) >= 1
        assert "failed: SinkUnavailable" in worker.log()
        # The worker goes on: alive, answering, and a retry is scheduled rather than a crash.
        assert worker.get("/healthz") is not None
        assert worker.alive()
    finally:
        worker.stop()
    assert worker.process is not None
    assert worker.process.returncode == 0
