"""The real-time path end to end: UnifiedMemoryClient → Kafka → worker process → ClickHouse.

Real Kafka, FerretDB, ClickHouse server (and chdb for the backend variant); nothing is mocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from bson import json_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from app import docjson
from app.identity import event_id_for
from app.producer import SaveResult, UnifiedMemoryClient
from tests import strategies
from tests.worker import Scenario, Worker, wait_for

pytestmark = pytest.mark.integration

COLLECTIONS = (("contexts", "context"), ("episodes", "episode"), ("facts", "fact"))


@pytest.fixture
def scenario(stack, unique_name, tmp_path) -> Scenario:
    return Scenario(stack, unique_name, tmp_path)


async def save_all(client: UnifiedMemoryClient, docs: Sequence[tuple[str, dict, str]], concurrency: int = 64):
    semaphore = asyncio.Semaphore(concurrency)

    async def one(collection: str, doc: dict, data_type: str) -> SaveResult:
        async with semaphore:
            return await client.save(collection, doc, data_type, metadata={"test": True})

    return await asyncio.gather(*(one(*item) for item in docs))


async def republish(client: UnifiedMemoryClient, results: Sequence[SaveResult]) -> None:
    pending = [await client.topic.send(key=r.event.entity_id.encode(), value=r.event) for r in results]
    await asyncio.gather(*pending)


def run(coro):
    return asyncio.run(coro)


def history_counts(scenario: Scenario) -> tuple[int, int]:
    store = scenario.history()
    try:
        table = scenario.settings().history_table
        ((count, unique),) = store.query(f"SELECT count(), uniqExact(event_id) FROM {table}")
        return int(count), int(unique)
    finally:
        store.close()


def wait_for_rows(scenario: Scenario, expected: int, worker: Worker, timeout: float = 240) -> None:
    wait_for(lambda: history_counts(scenario)[0] >= expected, timeout, f"{expected} history rows", worker.log)


def wait_drained(worker: Worker, consumed_at_least: float, timeout: float = 240) -> None:
    wait_for(
        lambda: (
            worker.metric("memory_sync_events_consumed_total") >= consumed_at_least
            and worker.metric("memory_sync_consumer_lag") == 0
        ),
        timeout,
        f"worker to consume {consumed_at_least:.0f} events and reach lag 0",
        worker.log,
    )


def test_ten_thousand_saves_become_exactly_ten_thousand_rows(scenario):
    docs = [
        (collection, {"_id": f"doc-{i}", "n": i, "text": f"memory {i}", "tags": [i % 7]}, data_type)
        for i in range(10_000)
        for collection, data_type in [COLLECTIONS[i % 3]]
    ]
    worker = Worker(scenario).start()
    try:
        client = UnifiedMemoryClient.from_settings(scenario.settings())

        async def produce() -> list[SaveResult]:
            await client.start()
            try:
                return await save_all(client, docs)
            finally:
                await client.stop()

        results = run(produce())
        assert len({r.event.event_id for r in results}) == 10_000
        wait_for_rows(scenario, 10_000, worker)
        wait_drained(worker, 10_000)
        assert history_counts(scenario) == (10_000, 10_000)

        store = scenario.history()
        table = scenario.settings().history_table
        rows = store.query(
            f"SELECT event_id, entity_id, data_type, operation, collection, version, source, data, metadata, "
            f"event_ts_ms, toUnixTimestamp(event_time) FROM {table} "
            "WHERE entity_id IN ('doc-0', 'doc-4', 'doc-8') ORDER BY entity_id"
        )
        store.close()
        mongo = MongoClient(scenario.stack.mongodb_uri)[scenario.settings().mongodb_database]
        assert len(rows) == 3
        for (
            event_id,
            entity_id,
            data_type,
            operation,
            collection,
            version,
            source,
            data,
            metadata,
            ts,
            sec,
        ) in rows:
            i = int(entity_id.split("-")[1])
            assert (collection, data_type) == COLLECTIONS[i % 3]
            assert event_id == event_id_for(collection, entity_id, 1)
            assert (operation, version, source) == ("INSERT", 1, "realtime")
            assert metadata == '{"test":true}'
            stored = mongo[collection].find_one({"_id": entity_id})
            assert data == docjson.encode(stored)  # byte-identical to what a batch read would produce
            assert docjson.decode(data) == stored
            assert ts // 1000 == sec

        # The same events three more times: still one row each, all skipped by the table.
        duplicates_before = worker.metric("memory_sync_duplicate_events_skipped_total")

        async def publish_again() -> None:
            await client.start()
            try:
                for _ in range(3):
                    await republish(client, results)
            finally:
                await client.stop()

        client = UnifiedMemoryClient.from_settings(scenario.settings())
        run(publish_again())
        wait_drained(worker, 40_000)
        assert history_counts(scenario) == (10_000, 10_000)
        assert worker.metric("memory_sync_duplicate_events_skipped_total") - duplicates_before == 30_000
    finally:
        worker.stop()

    # After a restart the RocksDB table still knows every id: duplicates are skipped from the table,
    # without asking ClickHouse.
    restarted = Worker(scenario, label="w1").start()
    try:
        client = UnifiedMemoryClient.from_settings(scenario.settings())

        async def publish_once_more() -> None:
            await client.start()
            try:
                await republish(client, results)
            finally:
                await client.stop()

        run(publish_once_more())
        wait_drained(restarted, 10_000)
        assert history_counts(scenario) == (10_000, 10_000)
        assert restarted.metric("memory_sync_duplicate_events_skipped_total", {"layer": "table"}) == 10_000
        assert restarted.metric("memory_sync_duplicate_events_skipped_total", {"layer": "clickhouse"}) == 0
    finally:
        restarted.stop()


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_update_and_delete_make_ordered_history(scenario, backend, tmp_path):
    if backend == "chdb":
        scenario.extra_env["CLICKHOUSE_URL"] = f"chdb://{tmp_path / 'chdb'}"
    worker = Worker(scenario).start()
    try:
        client = UnifiedMemoryClient.from_settings(scenario.settings())

        async def lifecycle() -> None:
            await client.start()
            try:
                await client.save("contexts", {"_id": "e1", "title": "first"}, "context")
                await client.save("contexts", {"_id": "e1", "title": "second"}, "context")
                await client.save("contexts", {"_id": "e1", "title": "third", "extra": 1}, "context")
                deleted = await client.delete("contexts", "e1")
                assert deleted is not None
                assert deleted.version == 4
                assert await client.delete("contexts", "e1") is None
            finally:
                await client.stop()

        run(lifecycle())
        if backend == "server":
            wait_for_rows(scenario, 4, worker)
            store = scenario.history()
        else:
            # chdb is in-process and single-owner: read it after the worker has let go of it.
            wait_drained(worker, 4)
            worker.stop()
            store = scenario.history()
        table = scenario.settings().history_table
        rows = store.query(
            f"SELECT version, operation, visitParamExtractString(data, 'title') FROM {table} "
            "WHERE entity_id = 'e1' ORDER BY version"
        )
        store.close()
        assert rows == [
            (1, "INSERT", "first"),
            (2, "UPDATE", "second"),
            (3, "UPDATE", "third"),
            (4, "DELETE", "third"),
        ]
        assert (
            MongoClient(scenario.stack.mongodb_uri)[
                scenario.settings().mongodb_database
            ].contexts.count_documents({})
            == 0
        )
    finally:
        worker.stop()


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents=st.lists(strategies.documents(ferretdb_safe=True), min_size=20, max_size=40))
def test_every_bson_type_round_trips_mongo_event_clickhouse(documents, stack, tmp_path_factory):
    scenario = Scenario(stack, "f" + __import__("uuid").uuid4().hex[:10], tmp_path_factory.mktemp("fidelity"))
    worker = Worker(scenario).start()
    try:
        client = UnifiedMemoryClient.from_settings(scenario.settings())
        items = [("facts", {"_id": f"d{i}", **doc}, "fact") for i, doc in enumerate(documents)]

        async def produce() -> None:
            await client.start()
            try:
                await save_all(client, items, concurrency=8)
            finally:
                await client.stop()

        run(produce())
        wait_for_rows(scenario, len(items), worker)
        store = scenario.history()
        table = scenario.settings().history_table
        stored_rows = dict(store.query(f"SELECT entity_id, data FROM {table}"))
        store.close()
        mongo = MongoClient(stack.mongodb_uri)[scenario.settings().mongodb_database]
        for i in range(len(items)):
            from_mongo = mongo.facts.find_one({"_id": f"d{i}"})
            data = stored_rows[f"d{i}"]
            assert docjson.decode(data) == from_mongo, json_util.dumps(from_mongo)
            assert data == docjson.encode(from_mongo)
    finally:
        worker.stop()
