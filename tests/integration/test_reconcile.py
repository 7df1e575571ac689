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
from app.reconcile import RUNS_COLLECTION, DriftReport, Reconciler, Window, cli_run_id
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
    scenario: Scenario, window: Window, *, dry_run: bool = False, **env: str
) -> DriftReport:
    settings = scenario.settings(**env)
    mongo = async_client(settings)
    history = AsyncHistory.open(settings.clickhouse, settings.history_table)
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

    # A dry run reports the drift and writes nothing.
    dry = run(reconcile_once(scenario, window, dry_run=True))
    assert dry.totals() == {"scanned": 601, "present": 120, "repaired": 480, "failed": 1}
    assert len(history_rows(scenario)) == 150
    assert mongo[RUNS_COLLECTION].count_documents({"trigger": "cli"}) == 0

    report = run(reconcile_once(scenario, window))
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
