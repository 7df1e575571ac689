"""Batch reconciliation against the real servers: lost events are repaired, synced ones are not
duplicated, a killed run resumes from its checkpoint. Real Kafka, FerretDB and ClickHouse; no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
from pymongo import MongoClient

from app import docjson
from app.history import AsyncHistory
from app.identity import entity_id_of, event_id_for, now_ms_precision
from app.mongo import async_client
from app.producer import UnifiedMemoryClient
from app.reconcile import (
    RUNS_COLLECTION,
    CollectionProgress,
    DriftReport,
    Reconciler,
    RunStore,
    Superseded,
    Window,
    cli_run_id,
)
from tests.conftest import ROOT
from tests.worker import FAUST, Scenario, Worker, wait_for

pytestmark = pytest.mark.integration

COLLECTIONS = (("contexts", "context"), ("episodes", "episode"), ("facts", "fact"))


@pytest.fixture
def scenario(stack, unique_name, tmp_path) -> Scenario:
    return Scenario(stack, unique_name, tmp_path)


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


async def reconcile_once(
    scenario: Scenario,
    window: Window,
    *,
    dry_run: bool = False,
    existence_queries: list[list[tuple[str, str]]] | None = None,
    **env: str,
) -> DriftReport:
    """One run; with `existence_queries`, the keys of every existing_event_ids call are appended to it."""
    settings = scenario.settings(**env)
    mongo = async_client(settings)
    history = AsyncHistory.open(settings.clickhouse, settings.history_table)
    if existence_queries is not None:
        original = history.existing_event_ids

        async def counted(keys: list[tuple[str, str]]) -> set[str]:
            existence_queries.append(list(keys))
            return await original(keys)

        history.existing_event_ids = counted  # type: ignore[method-assign]
    try:
        reconciler = Reconciler.from_settings(settings, mongo[settings.mongodb_database], history)
        return await reconciler.run(cli_run_id(), window, settings.sync_collections, dry_run=dry_run)
    finally:
        await history.close()
        await mongo.close()


def history_rows(scenario: Scenario) -> dict[str, tuple[str, str, str, int]]:
    """event_id → (entity_id, source, data, version); asserts no event_id appears twice (no FINAL)."""
    store = scenario.history()
    try:
        table = scenario.settings().history_table
        ((count, unique),) = store.query(f"SELECT count(), uniqExact(event_id) FROM {table}")
        assert count == unique, f"{count - unique} duplicate rows"
        rows = store.query(f"SELECT event_id, entity_id, toString(source), data, version FROM {table}")
    finally:
        store.close()
    return {
        event_id: (entity_id, source, data, version) for event_id, entity_id, source, data, version in rows
    }


def direct_doc(i: int, data_type: str, version: int = 1, **extra: object) -> dict:
    """A document written straight to MongoDB, as the producer would have, but with no event."""
    return {
        "_id": f"direct-{i}",
        "n": i,
        "text": f"lost memory {i}",
        "nested": {"k": [i, str(i)]},
        **extra,
        "data_type": data_type,
        "version": version,
        "updated_at": now_ms_precision(),
    }


def test_lost_events_are_repaired_and_synced_ones_are_not_duplicated(scenario):
    db_name = scenario.settings().mongodb_database
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[db_name]
    started = datetime.now(UTC) - timedelta(seconds=1)

    # 1. 150 documents through the real-time path, with a worker running.
    worker = Worker(scenario).start()
    try:
        client = UnifiedMemoryClient.from_settings(scenario.settings())

        async def produce() -> None:
            await client.start()
            try:
                for i in range(150):
                    collection, data_type = COLLECTIONS[i % 3]
                    await client.save(
                        collection, {"_id": f"rt-{i}", "n": i}, data_type, metadata={"rt": True}
                    )
            finally:
                await client.stop()

        run(produce())
        wait_for(lambda: len(history_rows(scenario)) >= 150, 120, "150 real-time rows", worker.log)
    finally:
        worker.stop()
    realtime = history_rows(scenario)
    assert {source for _, source, _, _ in realtime.values()} == {"realtime"}

    # 2. Lost events: 450 new documents and 30 updates of synced ones written straight to MongoDB,
    #    plus one document reconciliation cannot use (no version).
    for i in range(450):
        collection, data_type = COLLECTIONS[i % 3]
        mongo[collection].insert_one(direct_doc(i, data_type))
    for i in range(0, 90, 3):
        mongo["contexts"].update_one(
            {"_id": f"rt-{i}"}, {"$set": {"version": 2, "updated_at": now_ms_precision(), "edited": True}}
        )
    mongo["facts"].insert_one({"_id": "bad-1", "data_type": "fact", "updated_at": now_ms_precision()})
    window = Window(started, datetime.now(UTC) + timedelta(seconds=1))

    # One existence query per page: pages of 64, so each collection takes several.
    page_size = 64
    collection_of = {
        entity_id_of(doc["_id"]): collection
        for collection, _ in COLLECTIONS
        for doc in mongo[collection].find(window.filter(), {"_id": 1})
    }
    pages = {
        collection: -(-mongo[collection].count_documents(window.filter()) // page_size)
        for collection, _ in COLLECTIONS
    }
    assert pages == {"contexts": 4, "episodes": 4, "facts": 4}

    def queries_per_collection(queries: list[list[tuple[str, str]]]) -> dict[str, int]:
        tally: dict[str, int] = {}
        for keys in queries:
            (collection,) = {collection_of[entity_id] for entity_id, _ in keys}  # one collection per query
            assert len(keys) <= page_size
            tally[collection] = tally.get(collection, 0) + 1
        return tally

    # A dry run reports the drift and writes nothing.
    queries: list[list[tuple[str, str]]] = []
    dry = run(reconcile_once(scenario, window, dry_run=True, existence_queries=queries, BATCH_SIZE="64"))
    assert queries_per_collection(queries) == pages
    assert dry.totals() == {"scanned": 601, "present": 120, "repaired": 480, "failed": 1}
    assert len(history_rows(scenario)) == 150
    assert mongo[RUNS_COLLECTION].count_documents({"trigger": "cli"}) == 0

    queries = []
    report = run(reconcile_once(scenario, window, existence_queries=queries, BATCH_SIZE="64"))
    assert queries_per_collection(queries) == pages
    assert report.state == "done"
    assert report.totals() == {"scanned": 601, "present": 120, "repaired": 480, "failed": 1}
    by_collection = {p.collection: p for p in report.collections}
    assert (by_collection["contexts"].repaired, by_collection["contexts"].present) == (180, 20)
    assert by_collection["facts"].failures == [
        {"entity_id": "bad-1", "reason": "field 'version' must be a non-negative integer, got None"}
    ]

    rows = history_rows(scenario)  # asserts count() == uniqExact(event_id)
    assert len(rows) == 150 + 480
    for collection, _ in COLLECTIONS:
        for doc in mongo[collection].find({"version": {"$exists": True}}):
            entity_id = entity_id_of(doc["_id"])
            event_id = event_id_for(collection, entity_id, doc["version"])
            assert event_id in rows, f"{collection}/{entity_id} v{doc['version']} missing"
            _, source, data, version = rows[event_id]
            assert version == doc["version"]
            # Same identity and the same bytes the real-time path writes for a document version.
            assert data == docjson.encode(doc)
            expected_source = "realtime" if entity_id.startswith("rt-") and doc["version"] == 1 else "batch"
            assert source == expected_source

    saved = mongo[RUNS_COLLECTION].find_one({"_id": report.run_id})
    assert saved["state"] == "done"
    assert saved["totals"] == report.totals()

    # Nothing left to repair.
    again = run(reconcile_once(scenario, window))
    assert again.totals() == {"scanned": 601, "present": 600, "repaired": 0, "failed": 1}
    assert len(history_rows(scenario)) == 630


def test_killed_run_resumes_from_its_checkpoint(scenario):
    """`faust -A app sync-batch` is SIGKILLed mid-run; `--resume` finishes it exactly."""
    settings = scenario.settings()
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[settings.mongodb_database]
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    total = 6000
    docs = [
        {
            "_id": f"k-{i:05d}",
            "payload": "x" * 200,
            "data_type": "context",
            "version": 1 + i % 3,
            # Ties on updated_at exercise the (updated_at, _id) keyset.
            "updated_at": (base + timedelta(milliseconds=i // 4)).replace(tzinfo=None),
        }
        for i in range(total)
    ]
    mongo["contexts"].insert_many(docs)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLICKHOUSE_"))},
        **scenario.env(BATCH_SIZE="100", SINK_BATCH_MAX_EVENTS="300", SYNC_COLLECTIONS="contexts"),
    }
    command = [
        FAUST,
        "-A",
        "app",
        "--json",
        "sync-batch",
        "--since",
        (base - timedelta(minutes=1)).isoformat(),
    ]
    log_path = scenario.workdir / "sync-batch.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def progress() -> int:
        run_doc = mongo[RUNS_COLLECTION].find_one({"job": "reconcile"})
        return run_doc["collections"][0]["scanned"] if run_doc else 0

    deadline = time.monotonic() + 120
    while progress() < 1500:
        assert process.poll() is None, f"sync-batch ended before it could be killed:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, "sync-batch made no progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL

    interrupted = mongo[RUNS_COLLECTION].find_one({"job": "reconcile"})
    checkpointed = interrupted["collections"][0]
    assert interrupted["state"] == "running"
    assert 1500 <= checkpointed["scanned"] < total
    assert checkpointed["done"] is False
    partial = history_rows(scenario)
    assert checkpointed["repaired"] <= len(partial) < total

    result = subprocess.run(
        [FAUST, "-A", "app", "--json", "sync-batch", "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["run_id"] == interrupted["_id"]
    assert summary["state"] == "done"
    assert summary["attempts"] == 2
    totals = summary["totals"]
    assert totals["scanned"] == total
    assert totals["failed"] == 0
    assert totals["repaired"] + totals["present"] == total
    # Only rows written after the last checkpoint (at most one insert batch) are found again: the
    # resumed run did not start over.
    assert totals["present"] <= 300 + 100

    rows = history_rows(scenario)  # count() == uniqExact(event_id)
    assert len(rows) == total
    expected = {event_id_for("contexts", d["_id"], d["version"]) for d in docs}
    assert set(rows) == expected


def test_a_superseded_copy_of_a_run_stops_and_cannot_write_its_checkpoint(scenario):
    """Two copies of one run (an owner whose stop timed out, and the new owner): checkpoint writes are
    fenced by attempt, so the old copy stops at its next write and the run ends exact."""
    settings = scenario.settings(BATCH_SIZE="100", SINK_BATCH_MAX_EVENTS="100")
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[settings.mongodb_database]
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    docs = [
        direct_doc(i, "context") | {"updated_at": (base + timedelta(seconds=i)).replace(tzinfo=None)}
        for i in range(300)
    ]
    mongo["contexts"].insert_many(docs)
    window = Window(base - timedelta(minutes=1), datetime.now(UTC))
    run_id = "reconcile-fence-test"

    async def go() -> tuple[DriftReport, dict]:
        client = async_client(settings)
        history = AsyncHistory.open(settings.clickhouse, settings.history_table)
        try:
            db = client[settings.mongodb_database]
            store = RunStore(db)
            old = Reconciler.from_settings(settings, db, history)
            original = history.existing_event_ids

            async def new_owner_opens_the_run(keys: list[tuple[str, str]]) -> set[str]:
                # While the old copy works on its first page, the new owner opens the run again.
                history.existing_event_ids = original  # type: ignore[method-assign]
                reopened = await store.open(
                    DriftReport(run_id, window, [CollectionProgress("contexts")], trigger="schedule")
                )
                assert reopened.attempts == 2
                return await original(keys)

            history.existing_event_ids = new_owner_opens_the_run  # type: ignore[method-assign]
            with pytest.raises(Superseded, match="attempt 1 was superseded"):
                await old.run(run_id, window, ["contexts"], trigger="schedule")
            after_old = await db[RUNS_COLLECTION].find_one({"_id": run_id})

            # A stale report can neither save a checkpoint nor mark the outcome.
            stale = DriftReport(run_id, window, [CollectionProgress("contexts", scanned=999)], attempts=1)
            with pytest.raises(Superseded):
                await store.save(stale)
            with pytest.raises(Superseded):
                await store.mark(run_id, 1, "failed", "stale")

            # The current owner continues the run and finishes it exactly.
            new = Reconciler.from_settings(settings, db, history)
            return await new.run(run_id, window, ["contexts"], trigger="schedule"), after_old
        finally:
            await history.close()
            await client.close()

    report, after_old = run(go())
    # The old copy wrote nothing after it was superseded: no checkpoint, no failure.
    assert after_old["state"] == "running"
    assert after_old["attempts"] == 2
    assert after_old.get("error") is None
    assert after_old["collections"][0]["scanned"] == 0
    assert report.state == "done"
    assert report.attempts == 3
    assert report.totals()["scanned"] == 300
    assert report.totals()["repaired"] + report.totals()["present"] == 300
    saved = mongo[RUNS_COLLECTION].find_one({"_id": run_id})
    assert (saved["state"], saved["attempts"], saved["totals"]["scanned"]) == ("done", 3, 300)
    assert len(history_rows(scenario)) == 300


def cli(scenario: Scenario, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLICKHOUSE_"))},
        **scenario.env(**env),
    }
    return subprocess.run(
        [FAUST, "-A", "app", *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180
    )


def history_count(scenario: Scenario) -> int:
    store = scenario.history()
    try:
        ((count,),) = store.query(f"SELECT count() FROM {scenario.settings().history_table}")
        return int(count)
    except Exception:  # the table does not exist yet
        return 0
    finally:
        store.close()


def test_sync_batch_options(scenario):
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[scenario.settings().mongodb_database]
    mongo["contexts"].insert_many([direct_doc(i, "context") for i in range(20)])
    mongo["episodes"].insert_many([direct_doc(100 + i, "episode") for i in range(7)])
    # One collection, dry run: only it is read and reported, and nothing is written.
    result = cli(scenario, "sync-batch", "--hours", "1", "--collection", "episodes", "--dry-run", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True
    assert list(summary["collections"]) == ["episodes"]
    assert summary["totals"] == {"scanned": 7, "present": 0, "repaired": 7, "failed": 0}
    assert history_count(scenario) == 0
    assert mongo[RUNS_COLLECTION].count_documents({}) == 0

    both = cli(scenario, "sync-batch", "--since", "2024-01-01T00:00:00", "--hours", "1")
    assert both.returncode == 2, both.stdout + both.stderr
    assert "give --since or --hours, not both" in both.stderr

    typo = cli(scenario, "sync-batch", "--hours", "1", "--collection", "episodes", "--collection", "contxets")
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "--collection 'contxets': no such collection in database" in typo.stderr
    assert "contexts" in typo.stderr  # the collections that do exist are listed
    assert history_count(scenario) == 0
    assert mongo[RUNS_COLLECTION].count_documents({}) == 0


def test_cli_runs_show_in_stats_and_set_the_last_success_gauge_across_restarts(scenario):
    settings = scenario.settings()
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[settings.mongodb_database]
    mongo["contexts"].insert_many([direct_doc(i, "context") for i in range(12)])
    mongo["facts"].insert_many([direct_doc(100 + i, "fact") for i in range(5)])
    mongo["facts"].insert_one({"_id": "bad-1", "data_type": "fact", "updated_at": now_ms_precision()})
    result = cli(scenario, "--json", "sync-batch", "--hours", "1")
    assert result.returncode == 3, result.stdout + result.stderr  # done, one document failed
    run_id = json.loads(result.stdout)["run_id"]
    finished_at = mongo[RUNS_COLLECTION].find_one({"_id": run_id})["finished_at"].replace(tzinfo=UTC)
    expected = {
        "contexts": {"scanned": 12, "present": 0, "repaired": 12, "failed": 0},
        "episodes": {"scanned": 0, "present": 0, "repaired": 0, "failed": 0},
        "facts": {"scanned": 6, "present": 0, "repaired": 5, "failed": 1},
    }
    # Schedules whose last time is 10 days ago: no catch-up run at start, so the only success the
    # workers can know of is the CLI run.
    day = (datetime.now(UTC) - timedelta(days=10)).day
    quiet = {"RECONCILE_SCHEDULE": f"0 2 {day} * *", "RETENTION_SCHEDULE": f"0 3 {day} * *"}

    def shows_the_run(worker: Worker) -> None:
        def cli_run() -> dict | None:
            body = worker.get("/stats")
            runs = json.loads(body)["runs"]["recent"] if body else []
            return next((r for r in runs if r["run"] == run_id), None)

        shown = wait_for(cli_run, 30, "the CLI run in /stats", worker.log)
        assert shown["job"] == "reconcile"
        assert shown["scheduled_for"] == "manual"
        assert shown["state"] == "done"
        assert shown["collections"] == expected
        assert shown["finished_at"] is not None
        assert shown["started_at"] is not None
        page = (worker.get("/stats/html") or b"").decode()
        assert "reconcile manual: done" in page
        assert "<td>contexts</td><td>12</td><td>0</td><td>12</td><td>0</td>" in page
        assert "<td>facts</td><td>6</td><td>0</td><td>5</td><td>1</td>" in page

        def gauge() -> float:
            return worker.metric("memory_sync_job_last_success_timestamp_seconds", {"job_name": "reconcile"})

        wait_for(lambda: gauge() > 0, 30, "the last-success gauge", worker.log)
        assert gauge() == pytest.approx(finished_at.timestamp(), abs=1.0)
        assert "scheduler: reconcile@" not in worker.log()  # no scheduled run muddied the gauge

    # A fresh worker, then the same worker restarted: both read the run from the store.
    for label in ("w1", "w1-restarted"):
        worker = Worker(scenario, label=label, **quiet).start()
        try:
            shows_the_run(worker)
        finally:
            worker.stop()
