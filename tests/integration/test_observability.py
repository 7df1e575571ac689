"""What operators see, on a real stack: /metrics (types, counts after a known load, lag, promtool), the
stats views, the probes, and the Faust routes that stay closed by default. Nothing is mocked.

- `test_scrape_counts_stats_and_lag`: one pipeline through a worker's life: 1,000 events + 100
  duplicates (counters, rows, /stats, /stats/html, promtool), then the worker stopped while 300 more
  arrive (lag seen by the broker with the runbook's Kafka command), a worker started with ClickHouse
  unreachable (its lag gauge, /readyz 503, sink waiting, table routes when enabled), and ClickHouse
  coming back (it drains: lag 0, /readyz 200).
- `test_producer_process_exposes_published_metrics`: UnifiedMemoryClient in this process counts
  publishes in its own registry, served the way docs/operations.md tells applications to.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from app import docjson
from app.codecs import encode_event
from app.identity import event_id_for
from app.metrics import LATENCY_BUCKETS
from app.producer import UnifiedMemoryClient
from tests.conftest import ROOT
from tests.worker import Scenario, Worker, free_port, wait_for

pytestmark = pytest.mark.integration

# The seed's metrics, exactly as the text exposition (format 0.0.4, what /metrics serves) types them:
# prometheus_client keeps a counter's `_total` in its TYPE line there (OpenMetrics would drop it).
SEED_TYPES = {
    "memory_sync_events_published_total": "counter",
    "memory_sync_publish_latency_seconds": "histogram",
    "memory_sync_events_consumed_total": "counter",
    "memory_sync_consume_latency_seconds": "histogram",
    "memory_sync_consumer_lag": "gauge",
    "memory_sync_dlq_events_total": "counter",
    "memory_sync_duplicate_events_skipped_total": "counter",
}
OPERATOR_TYPES = {
    "memory_sync_job_last_success_timestamp_seconds": "gauge",
    "memory_sync_job_last_duration_seconds": "gauge",
    "memory_sync_job_failures_total": "counter",
    "memory_sync_reconcile_rows_repaired_total": "counter",
    "memory_sync_retention_rows_removed_total": "counter",
    "memory_sync_sink_waiting": "gauge",
    "memory_sync_rows_inserted_total": "counter",
    "memory_sync_publish_failures_total": "counter",
    "memory_sync_events_consumed_by_topic_total": "counter",
    "memory_sync_dlq_events_by_class_total": "counter",
    "memory_sync_consumer_lag_refreshed_timestamp_seconds": "gauge",
    # read by MemorySyncConsumerLagStale (prometheus_client's process collector, same registry)
    "process_start_time_seconds": "gauge",
}
# A few of Faust's sensor metrics (prefix faust_), served on the same registry.
FAUST_TYPES = {
    "faust_messages_received_total": "counter",
    "faust_events_runtime_latency": "histogram",
    "faust_topic_partition_end_offset": "gauge",
    "faust_topic_partition_offset_commited": "gauge",
    "faust_consumer_commit_latency": "histogram",
    "faust_assignment_operations_total": "counter",
}

LOAD = 1_000
DUPLICATES = 100
LATE = 300


# ------------------------------------------------------------------ helpers


def types_of(exposition: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.MULTILINE))


def sample(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape(worker: Worker) -> str:
    status, body = worker.get_status("/metrics")
    assert status == 200, body[:500]
    return body.decode()


def get_json(worker: Worker, path: str) -> tuple[int, dict]:
    status, body = worker.get_status(path)
    return status, json.loads(body)


def promtool_check_metrics(exposition: str) -> None:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: run scripts/bootstrap (Debian package `prometheus`)"
    result = subprocess.run(
        [binary, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"


def events(start: int, count: int) -> list[tuple[bytes, bytes]]:
    """Avro-encoded MemorySyncEvents of documents start..start+count-1, keyed by entity id."""
    now_ms = int(time.time() * 1000)
    records = []
    for i in range(start, start + count):
        entity = f"obs-{i}"
        document = docjson.normalise({"_id": entity, "i": i, "version": 1})
        event = {
            "event_id": event_id_for("facts", entity, 1),
            "entity_id": entity,
            "data_type": "fact",
            "operation": "INSERT",
            "collection": "facts",
            "timestamp": now_ms,
            "data": docjson.encode(document),
            "metadata": None,
        }
        records.append((entity.encode(), encode_event(event, "avro")))
    return records


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(topic, key=key, value=value) for key, value in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def history_rows(scenario: Scenario) -> int:
    store = scenario.history()
    try:
        ((count,),) = store.query(f"SELECT count() FROM {scenario.settings().history_table}")
        return int(count)
    finally:
        store.close()


def broker_lag(scenario: Scenario) -> dict[int, int]:
    """Lag per partition of the sync topic as Kafka's own tool reports it (the runbook's command)."""
    libs = os.environ.get("MEMSYNC_KAFKA_LIBS") or str(Path.home() / ".cache/memsync/kafka-4.1.1/libs")
    settings = scenario.settings()
    result = subprocess.run(
        [
            "java",
            "-cp",
            f"{libs}/*",
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            ",".join(settings.kafka_bootstrap_servers),
            "--describe",
            "--group",
            settings.consumer_group,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lag: dict[int, int] = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        # GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
        if len(fields) >= 6 and fields[1] == settings.sync_topic:
            lag[int(fields[2])] = int(fields[5])
    return lag


def docs_stats_fields() -> set[str]:
    """Field names (last component) in backticks in the `/stats` section of docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## `/stats` fields") :]
    section = section.split("\n## ", 1)[0]
    return {code.rsplit(".", 1)[-1] for code in re.findall(r"`([\w.*]+)`", section)}


def sync_topic_lag(exposition: str, topic: str) -> dict[str, float]:
    """memory_sync_consumer_lag of the sync topic, per partition."""
    return {
        s.labels["partition"]: s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == "memory_sync_consumer_lag" and s.labels.get("topic") == topic
    }


@contextmanager
def tcp_forwarder(listen_port: int, target_host: str, target_port: int) -> Iterator[None]:
    """127.0.0.1:listen_port -> target: stands in for ClickHouse coming back on the address a worker
    was given while nothing listened there."""
    server = socket.create_server(("127.0.0.1", listen_port))
    server.settimeout(0.2)
    stop = threading.Event()
    sockets: list[socket.socket] = []

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with closing(source), closing(sink):
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((target_host, target_port))
            sockets.extend((client, upstream))
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for sock in sockets:
            with closing(sock):
                pass


# ------------------------------------------------------------------ tests


def test_scrape_counts_stats_and_lag(stack, unique_name, tmp_path):
    scenario = Scenario(stack, unique_name, tmp_path)
    settings = scenario.settings()
    topic = settings.sync_topic
    started_ms = int(time.time() * 1000)
    worker = Worker(scenario).start()
    try:
        # -------- every metric is there, with its type, before any traffic
        before = scrape(worker)
        declared = types_of(before)
        for name, kind in {**SEED_TYPES, **OPERATOR_TYPES, **FAUST_TYPES}.items():
            assert declared.get(name) == kind, f"# TYPE {name} {kind} missing (got {declared.get(name)})"
        # the job failure counters exist at 0 from the start (increase() sees the first failure)
        for job in ("reconcile", "retention"):
            assert f'memory_sync_job_failures_total{{job_name="{job}"}} 0.0' in before
        # HighDLQRate's two counters have no label of their own (the seed's division pairs them), and
        # every error class is there at 0
        assert "memory_sync_events_consumed_total 0.0" in before.splitlines()
        assert "memory_sync_dlq_events_total 0.0" in before.splitlines()
        for error_class in ("undecodable", "too_large", "invalid_data", "rejected_by_clickhouse"):
            assert f'memory_sync_dlq_events_by_class_total{{error_class="{error_class}"}} 0.0' in before

        # -------- a known load: 1,000 events, then 100 of them again
        wait_for(lambda: get_json(worker, "/stats")[1]["assignment"], 60, "partitions assigned", worker.log)
        load = events(0, LOAD)
        produce(stack.kafka_bootstrap, topic, load + load[:DUPLICATES])

        def drained(consumed: int) -> bool:
            exposition = scrape(worker)
            lag = sync_topic_lag(exposition, topic)
            return (
                sample(exposition, "memory_sync_events_consumed_total") >= consumed
                and sample(exposition, "memory_sync_rows_inserted_total") >= LOAD
                and sample(exposition, "memory_sync_duplicate_events_skipped_total") >= DUPLICATES
                and len(lag) == scenario.partitions
                and not any(lag.values())
            )

        wait_for(lambda: drained(LOAD + DUPLICATES), 120, "the load written and lag 0", worker.log)

        # the group's committed offsets reached the end (the gauge above may be one refresh old)
        def committed_to_the_end() -> bool:
            lag = broker_lag(scenario)
            return len(lag) == scenario.partitions and not any(lag.values())

        wait_for(committed_to_the_end, 60, "offsets committed to the end", worker.log)
        after = scrape(worker)
        assert sample(after, "memory_sync_events_consumed_total") == LOAD + DUPLICATES
        assert sample(after, "memory_sync_events_consumed_by_topic_total", topic=topic) == LOAD + DUPLICATES
        assert sample(after, "memory_sync_events_consumed_by_topic_total", topic=settings.retry_topic) == 0
        assert sample(after, "memory_sync_duplicate_events_skipped_total") == DUPLICATES
        assert sample(after, "memory_sync_rows_inserted_total", source="realtime") == LOAD
        assert sample(after, "memory_sync_dlq_events_total") == 0
        assert sample(after, "memory_sync_dlq_events_by_class_total") == 0
        # the lag gauges were refreshed moments ago (every 5 s)
        assert time.time() - sample(after, "memory_sync_consumer_lag_refreshed_timestamp_seconds") < 30
        assert sample(after, "memory_sync_sink_waiting") == 0
        assert history_rows(scenario) == LOAD
        # consume latency (save -> insert): one observation per written row, all in finite buckets,
        # well under the largest bucket and above the smallest
        assert sample(after, "memory_sync_consume_latency_seconds_count") == LOAD
        largest = LATENCY_BUCKETS[-1]
        assert sample(after, "memory_sync_consume_latency_seconds_bucket", le=str(float(largest))) == LOAD
        assert sample(after, "memory_sync_consume_latency_seconds_bucket", le="30.0") == LOAD
        assert sample(after, "memory_sync_consume_latency_seconds_bucket", le=str(LATENCY_BUCKETS[0])) < LOAD
        # where the batches spent their time: every phase a clean batch goes through has samples
        batches = sample(after, "memory_sync_batch_phase_seconds_count", phase="decode")
        assert batches >= 1
        for phase in ("table", "clickhouse_lookup", "insert", "mark"):
            assert sample(after, "memory_sync_batch_phase_seconds_count", phase=phase) >= 1, phase
        assert sample(after, "memory_sync_batch_phase_seconds_count", phase="route") == 0
        # Faust's sensor is served too (the sync topic's records bypass its per-message counters,
        # see docs/operations.md; the control topic's go through them)
        assert sample(after, "faust_messages_received_total") >= 1
        assert sample(after, "faust_assignment_operations_total", operation="completed") >= 1
        promtool_check_metrics(after)

        # -------- the stats views
        status, stats = get_json(worker, "/stats")
        assert status == 200
        assert stats.keys() >= {
            "worker_id", "uptime_s", "config", "assignment", "sink", "counts", "lag",
            "idempotency_table", "dlq", "jobs",
        }  # fmt: skip
        assert stats["worker_id"] == "w1"
        assert {f"{topic}[{p}]" for p in range(scenario.partitions)} <= set(stats["assignment"])
        assert stats["counts"]["consumed"] == LOAD + DUPLICATES
        assert stats["counts"]["consumed_by_topic"] == {topic: LOAD + DUPLICATES}
        assert set(stats["counts"]["dlq_by_class"].values()) == {0}
        assert stats["counts"]["duplicates_skipped"] == DUPLICATES
        assert sum(stats["counts"]["duplicates_by_layer"].values()) == DUPLICATES
        assert stats["counts"]["dlq"] == 0
        assert stats["counts"]["rows_inserted"] == LOAD
        assert stats["lag"][topic] == {str(p): 0 for p in range(scenario.partitions)}
        assert time.time() - stats["lag_refreshed_at"] < 30
        assert stats["sink"]["state"] == "healthy"
        assert stats["sink"]["reason"] == ""
        assert stats["sink"]["last_insert_rows"] > 0
        table = stats["idempotency_table"]
        assert sorted(table) == [str(p) for p in range(scenario.partitions)]
        assert sum(part["marked_by_this_worker"] for part in table.values()) == LOAD
        # the table's counts are a cached scan of its RocksDB (the timed one ran after recovery, before
        # the load); ?rescan=table waits for a fresh one
        status, rescanned = get_json(worker, "/stats?rescan=table")
        assert status == 200
        table = rescanned["idempotency_table"]
        assert sorted(table) == [str(p) for p in range(scenario.partitions)]
        assert sum(part["entries"] for part in table.values()) == LOAD
        for part in table.values():
            assert part["role"] == "active"
            assert part["entries"] > 0
            assert part["expired_entries"] == 0
            assert started_ms <= part["oldest_ms"] <= part["newest_ms"] <= part["scanned_at_ms"]
        written_by_w1 = {
            p: (part["entries"], part["oldest_ms"], part["newest_ms"]) for p, part in table.items()
        }
        assert stats["dlq"] == {"total": 0, "by_error_class": {}, "latest": []}

        # A starting worker requests the runs missed within the catch-up horizon (agents/scheduler.py):
        # on this fresh pipeline each of them runs once, with nothing to repair or remove.
        def jobs_done() -> dict:
            jobs = get_json(worker, "/stats")[1]["jobs"]
            return jobs if {j.get("status") for j in jobs.values()} == {"ok"} and len(jobs) == 2 else {}

        jobs = wait_for(jobs_done, 60, "the catch-up reconciliation and retention runs", worker.log)
        assert set(jobs) == {"reconcile", "retention"}
        for report in jobs.values():
            assert report["finished_at"] >= report["started_at"]
            assert report["summary"]
            # one run per scheduled time within the catch-up horizon (agents/scheduler.py, 3 days)
            assert {run["status"] for run in report["recent"]} == {"ok"}
        exposition = scrape(worker)
        for job in ("reconcile", "retention"):
            assert sample(exposition, "memory_sync_job_last_success_timestamp_seconds", job_name=job) == (
                pytest.approx(jobs[job]["finished_at"])
            )
            assert sample(exposition, "memory_sync_job_last_duration_seconds", job_name=job) >= 0
            assert sample(exposition, "memory_sync_job_failures_total", job_name=job) == 0

        # docs/operations.md explains every field
        fields = docs_stats_fields()
        shown = set(stats) | {f"{group}.{key}" for group in ("sink", "counts", "dlq") for key in stats[group]}
        shown |= {key for part in table.values() for key in part}
        shown |= {key for report in jobs.values() for key in report}
        undocumented = {name for name in shown if name.rsplit(".", 1)[-1] not in fields}
        assert not undocumented, f"docs/operations.md does not explain /stats fields {sorted(undocumented)}"

        status, page = worker.get_status("/stats/html")
        assert status == 200
        html = page.decode()
        assert html.startswith("<!doctype html>")
        for section in (
            "Counts", "Consumer lag", "Idempotency table", "Dead letters", "Scheduled jobs on this worker",
        ):  # fmt: skip
            assert f"<h2>{section}</h2>" in html
        assert '<b class="healthy">healthy</b>' in html
        assert f"<td>consumed</td><td>{LOAD + DUPLICATES}</td>" in html
        for name, value in rescanned["counts"].items():  # every count, not the first few
            if isinstance(value, dict):
                for key, count in value.items():
                    assert f"<td>{name}[{key}]</td><td>{count}</td>" in html, (name, key)
            else:
                assert f"<td>{name}</td><td>{value}</td>" in html, name
        assert f"<td>rows_inserted</td><td>{LOAD}</td>" in html
        assert "<td>reconcile</td><td>ok</td>" in html

        # -------- probes, and Faust's routes that would dump tables: closed by default
        assert get_json(worker, "/healthz") == (200, {"status": "alive", "worker_id": "w1"})
        assert get_json(worker, "/readyz") == (200, {"ready": True, "problems": {}})
        event_id = event_id_for("facts", "obs-0", 1)
        for path in (
            "/router/",
            "/table/",
            f"/table/processed-event-ids/{event_id}/",
            "/assignment/",
            "/graph/",
        ):
            assert worker.get_status(path)[0] == 404, path
        assert get_json(worker, "/") == (200, {"status": "OK"})  # Faust's production index, no stats
    finally:
        worker.stop()

    # -------- the worker is stopped and events keep coming: the broker sees the lag grow
    produce(stack.kafka_bootstrap, topic, events(LOAD, LATE))
    stopped_lag = broker_lag(scenario)
    assert len(stopped_lag) == scenario.partitions
    assert sum(stopped_lag.values()) == LATE

    # -------- a worker whose ClickHouse is unreachable holds the batch and reports the lag
    clickhouse = settings.clickhouse
    closed_port = free_port()
    blocked = Worker(
        scenario,
        label="w2",
        CLICKHOUSE_URL=f"clickhouse://{clickhouse.user}@127.0.0.1:{closed_port}/{clickhouse.database}",
        SINK_BACKOFF_MAX_SECONDS="1",
        WEB_TABLE_ROUTES_ENABLED="true",
    ).start()
    try:
        wait_for(
            lambda: sum(sync_topic_lag(scrape(blocked), topic).values()) == LATE,
            60,
            f"the lag gauge to report {LATE} on the sync topic",
            blocked.log,
        )
        waiting = scrape(blocked)
        assert sample(waiting, "memory_sync_sink_waiting") == 1
        assert sample(waiting, "memory_sync_rows_inserted_total") == 0
        status, ready = get_json(blocked, "/readyz")
        assert status == 503
        assert ready["ready"] is False
        assert "clickhouse" in ready["problems"], ready
        assert "mongodb" not in ready["problems"], ready
        assert get_json(blocked, "/healthz")[0] == 200
        stats = get_json(blocked, "/stats")[1]
        assert stats["sink"]["state"] == "waiting"
        assert stats["sink"]["reason"]
        assert sum(stats["lag"][topic].values()) == LATE

        # a new process: its idempotency table stats come from the store it recovered, not from its
        # own marks (it made none)
        def table_scanned() -> dict:
            table = get_json(blocked, "/stats")[1]["idempotency_table"]
            scanned = len(table) == scenario.partitions and all(p["scanned_at_ms"] for p in table.values())
            return table if scanned else {}

        table = wait_for(table_scanned, 60, "the table scan after recovery", blocked.log)
        assert {p: (part["entries"], part["oldest_ms"], part["newest_ms"]) for p, part in table.items()} == (
            written_by_w1
        )
        assert {part["marked_by_this_worker"] for part in table.values()} == {0}
        assert {part["role"] for part in table.values()} == {"active"}
        assert '<b class="waiting">waiting</b>' in blocked.get_status("/stats/html")[1].decode()

        # WEB_TABLE_ROUTES_ENABLED=true opens Faust's routes, which show table contents
        status, tables = get_json(blocked, "/table/")
        assert status == 200
        assert "processed-event-ids" in {t["name"] for t in tables}
        status, written_at = get_json(blocked, f"/table/processed-event-ids/{event_id}/")
        assert status == 200
        assert isinstance(written_at, int)
        assert blocked.get_status("/router/")[0] == 200

        # -------- ClickHouse is back on that address: the worker drains, lag returns to 0
        with tcp_forwarder(closed_port, clickhouse.host, clickhouse.port):
            wait_for(
                lambda: (
                    history_rows(scenario) == LOAD + LATE
                    and not any(sync_topic_lag(scrape(blocked), topic).values())
                ),
                90,
                "the late events written and lag 0",
                blocked.log,
            )
            wait_for(lambda: get_json(blocked, "/readyz")[0] == 200, 30, "ready again", blocked.log)
            drained = scrape(blocked)
            assert sample(drained, "memory_sync_sink_waiting") == 0
            assert sample(drained, "memory_sync_rows_inserted_total") == LATE
            assert get_json(blocked, "/stats")[1]["sink"]["state"] == "healthy"
            blocked.stop()
    finally:
        blocked.stop()
    final_lag = broker_lag(scenario)
    assert len(final_lag) == scenario.partitions
    assert not any(final_lag.values())


def test_producer_process_exposes_published_metrics(stack, unique_name, tmp_path):
    """A producer-only application (UnifiedMemoryClient outside a worker) counts what it publishes in
    its own process registry; `start_http_server` serves it (docs/operations.md)."""
    scenario = Scenario(stack, unique_name, tmp_path, partitions=1)
    topic = scenario.settings().sync_topic
    saves = 20

    def published() -> float:
        return REGISTRY.get_sample_value("memory_sync_events_published_total", {"topic": topic}) or 0.0

    def latency_count() -> float:
        return REGISTRY.get_sample_value("memory_sync_publish_latency_seconds_count") or 0.0

    published_before, latency_before = published(), latency_count()
    client = UnifiedMemoryClient.from_settings(scenario.settings())

    async def save_some() -> None:
        await client.start()
        try:
            for i in range(saves):
                await client.save("facts", {"_id": f"p{i}", "n": i}, "fact")
        finally:
            await client.stop()

    asyncio.run(save_some())
    assert published() - published_before == saves
    assert latency_count() - latency_before == saves
    assert REGISTRY.get_sample_value("memory_sync_publish_latency_seconds_bucket", {"le": "+Inf"}) >= saves

    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            exposition = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    declared = types_of(exposition)
    assert declared["memory_sync_events_published_total"] == "counter"
    assert declared["memory_sync_publish_latency_seconds"] == "histogram"
    assert sample(exposition, "memory_sync_events_published_total", topic=topic) == published()
    promtool_check_metrics(exposition)
    assert generate_latest(REGISTRY)  # the same registry the worker's /metrics serves
