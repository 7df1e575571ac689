"""Poison records go to the DLQ with their reason (after retries where retrying may help), the DLQ agent
counts them, and `faust -A app dlq-replay` re-publishes dead letters without creating duplicates."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app import docjson
from app.codecs import encode_event
from app.identity import event_id_for
from app.kafka_clients import topic_partitions
from tests.conftest import ROOT
from tests.worker import Scenario, Worker, wait_for

pytestmark = pytest.mark.integration

FAUST = str(Path(sys.executable).with_name("faust"))


def event_bytes(i: int, *, data: str | None = None) -> tuple[bytes, bytes]:
    entity = f"ent-{i}"
    document = docjson.normalise({"_id": entity, "i": i, "version": 1})
    event = {
        "event_id": event_id_for("facts", entity, 1),
        "entity_id": entity,
        "data_type": "fact",
        "operation": "INSERT",
        "collection": "facts",
        "timestamp": 1_764_000_000_000 + i,
        "data": docjson.encode(document) if data is None else data,
        "metadata": None,
    }
    return entity.encode(), encode_event(event, "avro")


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], headers=None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v, headers=headers or []) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(scenario: Scenario, topic: str) -> list:
    settings = scenario.settings()
    tps = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def headers(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def history_count(scenario: Scenario) -> tuple[int, int]:
    with scenario.history() as store:
        ((count, unique),) = store.query(
            f"SELECT count(), uniqExact(event_id) FROM {scenario.settings().history_table}"
        )
    return int(count), int(unique)


def faust_command(scenario: Scenario, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLICKHOUSE_"))}
    return subprocess.run(
        [FAUST, "-A", "app", *args],
        cwd=ROOT,
        env={**env, **scenario.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_poison_goes_to_the_dlq_with_its_reason_and_good_records_flow(stack, unique_name, tmp_path):
    scenario = Scenario(stack, unique_name, tmp_path, partitions=2)
    worker = Worker(scenario).start()
    try:
        topic = scenario.settings().sync_topic
        good = [event_bytes(i) for i in range(200)]
        poison = [
            (b"bad-1", b"\x00\x01not avro"),
            event_bytes(1001, data="{not json"),
            event_bytes(1002, data='{"pad":"' + "x" * 1_100_000 + '"}'),
        ]
        asyncio.run(produce(stack.kafka_bootstrap, topic, good[:100] + poison + good[100:]))
        wait_for(lambda: history_count(scenario)[0] >= 200, 120, "good rows", worker.log)
        # Retryable failures go through 1 s, 2 s and 4 s retries first.
        dead = wait_for(
            lambda: (
                (r := asyncio.run(read_all(scenario, scenario.settings().dlq_topic))) and len(r) >= 3 and r
            ),
            90,
            "3 dead letters",
            worker.log,
        )
        assert history_count(scenario) == (200, 200)
        by_class = {headers(r)["memsync.error_class"]: r for r in dead}
        assert set(by_class) == {"undecodable", "invalid_data", "too_large"}
        assert headers(by_class["undecodable"])["memsync.attempts"] == "1"  # no retries: they cannot help
        assert headers(by_class["invalid_data"])["memsync.attempts"] == "4"  # 1 try + 3 retries
        assert headers(by_class["too_large"])["memsync.attempts"] == "4"
        assert by_class["undecodable"].value == b"\x00\x01not avro"  # original bytes kept
        assert by_class["undecodable"].key == b"bad-1"
        for record in dead:
            h = headers(record)
            assert h["memsync.source_topic"] == topic
            assert int(h["memsync.source_offset"]) >= 0
            assert h["memsync.worker_id"] == "w1"
            assert int(h["memsync.first_failure_ms"]) <= int(h["memsync.last_failure_ms"])
        wait_for(lambda: worker.metric("memory_sync_dlq_events_total") == 3, 30, "DLQ metric", worker.log)
        stats = wait_for(
            lambda: (s := json.loads(worker.get("/stats") or b"{}")) and s["dlq"]["total"] == 3 and s,
            30,
            "DLQ agent stats",
        )
        assert stats["dlq"]["by_error_class"] == {"undecodable": 1, "invalid_data": 1, "too_large": 1}
        assert all("x" * 100 not in str(e) for e in stats["dlq"]["latest"])  # never the payload
    finally:
        worker.stop()


def test_dlq_replay_republishes_once_and_twice_creates_no_duplicates(stack, unique_name, tmp_path):
    scenario = Scenario(stack, unique_name, tmp_path, partitions=2)
    worker = Worker(scenario).start()
    try:
        settings = scenario.settings()
        # Dead letters of records that were fine (e.g. ClickHouse rejected them before a schema fix).
        recovered = [event_bytes(i) for i in range(50)]
        asyncio.run(
            produce(
                stack.kafka_bootstrap,
                settings.dlq_topic,
                recovered,
                headers=[("memsync.error_class", b"rejected_by_clickhouse")],
            )
        )
        asyncio.run(
            produce(
                stack.kafka_bootstrap,
                settings.dlq_topic,
                [(b"junk", b"\xff\xfe")],
                headers=[("memsync.error_class", b"undecodable")],
            )
        )

        dry = faust_command(scenario, "dlq-replay", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "matching: 51" in dry.stdout
        assert "rejected_by_clickhouse: 50" in dry.stdout

        for _ in range(2):
            result = faust_command(scenario, "dlq-replay", "--error-class", "rejected_by_clickhouse")
            assert result.returncode == 0, result.stderr
            assert "replayed: 50" in result.stdout
        wait_for(
            lambda: worker.metric("memory_sync_events_consumed_total") >= 100,  # the sync topic's only
            120,
            "both replays consumed",
            worker.log,
        )
        wait_for(lambda: worker.metric("memory_sync_consumer_lag") == 0, 60, "lag 0", worker.log)
        assert history_count(scenario) == (50, 50)
        with scenario.history() as store:
            assert store.query(f"SELECT DISTINCT source FROM {settings.history_table}") == [("replay",)]
        assert worker.metric("memory_sync_duplicate_events_skipped_total") == 50

        bad = faust_command(scenario, "dlq-replay", "--since", "yesterday")
        assert bad.returncode == 2
        assert "--since" in bad.stderr
    finally:
        worker.stop()
