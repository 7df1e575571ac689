"""Each server of the local stack is real and answers its native protocol."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import chdb
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from clickhouse_driver import Client
from pymongo import MongoClient

pytestmark = pytest.mark.integration


def test_kafka_produce_consume_round_trip(stack, unique_name):
    async def round_trip() -> list[tuple[bytes, bytes]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(unique_name, num_partitions=2, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(10):
                await producer.send_and_wait(unique_name, key=f"k{i}".encode(), value=f"v{i}".encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            unique_name,
            bootstrap_servers=stack.kafka_bootstrap,
            group_id=unique_name,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        received: list[tuple[bytes, bytes]] = []
        # A broker that stops delivering must fail the test, not hang it.
        deadline = asyncio.get_running_loop().time() + 60
        try:
            while len(received) < 10:
                assert asyncio.get_running_loop().time() < deadline, f"{len(received)}/10 consumed in 60s"
                batches = await asyncio.wait_for(consumer.getmany(timeout_ms=1000), 30)
                for records in batches.values():
                    received.extend((r.key, r.value) for r in records)
        finally:
            await consumer.stop()
        return received

    received = asyncio.run(round_trip())
    assert sorted(received) == sorted((f"k{i}".encode(), f"v{i}".encode()) for i in range(10))


def test_kafka_rejects_unknown_topic_auto_creation(stack, unique_name):
    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, request_timeout_ms=3000)
        await producer.start()
        try:
            await asyncio.wait_for(producer.send_and_wait(unique_name, b"x"), 10)
        finally:
            await producer.stop()

    with pytest.raises((KafkaError, asyncio.TimeoutError)):
        asyncio.run(produce())

    async def topics() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    assert unique_name not in asyncio.run(topics())


def test_ferretdb_insert_find_update_delete(stack, unique_name):
    client = MongoClient(stack.mongodb_uri, serverSelectionTimeoutMS=5000)
    collection = client[unique_name]["docs"]
    collection.insert_one({"_id": "a", "n": 1, "tags": ["x"]})
    assert collection.find_one({"_id": "a"}) == {"_id": "a", "n": 1, "tags": ["x"]}
    collection.update_one({"_id": "a"}, {"$inc": {"n": 1}, "$set": {"tags": ["x", "y"]}})
    assert collection.find_one({"_id": "a"})["n"] == 2
    assert collection.delete_one({"_id": "a"}).deleted_count == 1
    assert collection.count_documents({}) == 0
    assert client.admin.command("buildInfo")["ferretdbVersion"].startswith("v1.24")
    client.drop_database(unique_name)


STATEMENTS = (
    "CREATE TABLE {t} (id UInt64, name String, at DateTime) ENGINE = MergeTree() "
    "PARTITION BY toYYYYMM(at) ORDER BY id",
    # Inline VALUES through the native protocol waits for client data blocks on 18.16; INSERT SELECT
    # is one plain query on every server.
    "INSERT INTO {t} SELECT 1, 'one', toDateTime('2024-01-01 00:00:00') "
    "UNION ALL SELECT 2, 'two', toDateTime('2024-02-01 00:00:00')",
    "SELECT id, name, toString(at) FROM {t} ORDER BY id",
)


def test_clickhouse_server_create_insert_select(stack, unique_name):
    url = urlsplit(stack.clickhouse_url)
    client = Client(host=url.hostname, port=url.port, user=url.username or "default")
    assert client.execute("SELECT version()")[0][0].startswith("18.16")
    for statement in STATEMENTS[:2]:
        client.execute(statement.format(t=unique_name))
    client.execute(f"INSERT INTO {unique_name} (id, name, at) VALUES", [(3, "three", 1704067200)])
    rows = client.execute(STATEMENTS[2].format(t=unique_name))
    assert rows == [(1, "one", "2024-01-01 00:00:00"), (2, "two", "2024-02-01 00:00:00"),
                    (3, "three", "2024-01-01 00:00:00")]
    client.execute(f"DROP TABLE {unique_name}")


def test_chdb_runs_the_same_statements(tmp_path, unique_name):
    from chdb import session as chs

    sess = chs.Session(str(tmp_path / "chdb"))
    try:
        version = sess.query("SELECT version()", "CSV").data()
        # chdb>=4.4 (setup.cfg) embeds the 26.x engine the issue names as the modern backend.
        assert int(version.strip().strip('"').split(".")[0]) >= 26, version
        for statement in STATEMENTS[:2]:
            sess.query(statement.format(t=unique_name))
        result = sess.query(STATEMENTS[2].format(t=unique_name), "CSV").data()
        assert result.splitlines() == ['1,"one","2024-01-01 00:00:00"', '2,"two","2024-02-01 00:00:00"']
    finally:
        sess.close()
    assert chdb.__version__
