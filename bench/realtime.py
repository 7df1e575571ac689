"""Real-time path throughput and latency next to a raw baseline, in the same run, on the same topic.

    python -m bench.realtime [--events 200000] [--steady-rate 5000] [--steady-seconds 20]

1. Pre-loads N Avro events (the real identity, canonical Extended JSON `data` of ~400 bytes, a few
   versions per entity) into a fresh topic.
2. Baseline: a plain aiokafka `getmany` consumer that decodes with fastavro and bulk-inserts 20,000
   rows per INSERT into its own empty history table (same DDL, same ClickHouse). No dedup, no table.
3. memsync: a real `faust -A app worker` on the same topic (its own group and table), timed from its
   first consumed event until all N rows are in ClickHouse.
4. Steady load: the worker keeps running while events are produced at --steady-rate for
   --steady-seconds; save→ClickHouse latency quantiles come from the worker's
   memory_sync_consume_latency_seconds histogram (bucket-interpolated, as Prometheus would).

Prints events/s of both, the ratio (target >= 0.6), p50/p95/p99, rows per insert, and a markdown row
for bench/RESULTS.md. Needs the local stack (`make bench-realtime` brings it up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app import docjson
from app.codecs import decode_avro, encode_event
from app.history import HistoryRow, HistoryStore
from app.identity import event_id_for
from app.settings import Settings
from bench.batch import machine
from tests.conftest import StackEnv
from tests.worker import Scenario, Worker, wait_for

PARTITIONS = 4
INSERT_ROWS = 20_000
WORDS = ("memory", "agent", "context", "episode", "fact", "user", "session", "tool", "result", "plan")


def make_events(count: int, start: int = 0, *, now_ms: bool = False) -> list[tuple[bytes, bytes]]:
    rng = random.Random(start)
    return [make_event(i, rng, now_ms=now_ms) for i in range(start, start + count)]


def make_event(i: int, rng: random.Random, *, now_ms: bool = False) -> tuple[bytes, bytes]:
    entity = f"e{i // 3}"
    version = i % 3 + 1
    document = docjson.normalise(
        {
            "_id": entity,
            "text": " ".join(rng.choice(WORDS) for _ in range(40)),
            "score": rng.random(),
            "tags": [rng.choice(WORDS) for _ in range(3)],
            "data_type": "context",
            "version": version,
        }
    )
    event = {
        "event_id": event_id_for("contexts", entity, version),
        "entity_id": entity,
        "data_type": "context",
        "operation": "INSERT" if version == 1 else "UPDATE",
        "collection": "contexts",
        "timestamp": int(time.time() * 1000) if now_ms else 1_764_000_000_000 + i,
        "data": docjson.encode(document),
        "metadata": None,
    }
    return entity.encode(), encode_event(event, "avro")


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes, bytes]] | Callable[[int], tuple[bytes, bytes]],
    rate: float = 0,
    count: int = 0,
) -> float:
    """Send records as fast as possible, or `count` records built on the fly at `rate` events/s (so
    each event's timestamp is its send time)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    source = (records(n) for n in range(count)) if callable(records) else records
    try:
        pending = []
        for n, (key, value) in enumerate(source):
            if rate and n % 50 == 0:
                ahead = n / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            pending.append(await producer.send(topic, key=key, value=value))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def baseline(bootstrap: str, topic: str, store: HistoryStore, total: int) -> float:
    """Plain getmany + fastavro + bulk insert: the fastest honest consumer into the same table shape."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"baseline-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    loop = asyncio.get_running_loop()
    seen = 0
    rows: list[HistoryRow] = []
    started: float | None = None
    try:
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=INSERT_ROWS)
            if started is None and batches:
                started = time.perf_counter()
            for records in batches.values():
                for record in records:
                    event = decode_avro(record.value)
                    rows.append(
                        HistoryRow(
                            event["event_id"],
                            event["entity_id"],
                            event["data_type"],
                            event["operation"],
                            event["collection"],
                            event["timestamp"],
                            0,
                            event["data"],
                            event["metadata"],
                            "realtime",
                        )
                    )
            seen += sum(len(r) for r in batches.values())
            if len(rows) >= INSERT_ROWS or (seen >= total and rows):
                batch, rows = rows, []
                await loop.run_in_executor(None, store.insert, batch)
                await consumer.commit()
    finally:
        await consumer.stop()
    return time.perf_counter() - (started or time.perf_counter())


def count(store: HistoryStore, table: str) -> int:
    return int(store.query(f"SELECT count() FROM {table}")[0][0])


def histogram_buckets(worker: Worker, name: str) -> list[tuple[float, float]]:
    body = (worker.get("/metrics") or b"").decode()
    buckets: list[tuple[float, float]] = []
    for line in body.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(buckets)


def quantiles_between(
    before: list[tuple[float, float]], after: list[tuple[float, float]], quantiles: tuple[float, ...]
) -> dict[float, float]:
    """Quantiles of the observations made between two scrapes, interpolated in buckets as
    Prometheus' histogram_quantile does."""
    earlier = dict(before)
    buckets = [(bound, cumulative - earlier.get(bound, 0.0)) for bound, cumulative in after]
    total = buckets[-1][1] if buckets else 0.0
    result = {}
    for q in quantiles:
        rank = q * total
        previous_bound, previous_count = 0.0, 0.0
        for bound, cumulative in buckets:
            if cumulative >= rank:
                if bound == float("inf"):
                    result[q] = previous_bound
                else:
                    span = cumulative - previous_count
                    fraction = (rank - previous_count) / span if span else 1.0
                    result[q] = previous_bound + (bound - previous_bound) * fraction
                break
            previous_bound, previous_count = bound, cumulative
    return result


def process_cpu_s(worker: Worker) -> float:
    """CPU seconds (user + system) the worker process has used: on a shared machine, CPU per event is
    the steadier measure of the worker's own cost."""
    assert worker.process is not None
    fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(worker: Worker) -> float:
    """The worker's peak resident memory (VmHWM), MiB: what the batches in flight cost."""
    assert worker.process is not None
    for line in Path(f"/proc/{worker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--steady-rate", type=float, default=5000)
    parser.add_argument("--steady-seconds", type=float, default=20)
    args = parser.parse_args()

    stack = StackEnv(
        kafka_bootstrap=os.environ["KAFKA_BOOTSTRAP_SERVERS"],
        mongodb_uri=os.environ["MONGODB_URI"],
        clickhouse_url=os.environ["CLICKHOUSE_URL"],
        stack_dir=Path(os.environ["MEMSYNC_STACK_DIR"]),
    )
    name = "bench" + uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="memsync-bench-"))
    scenario = Scenario(stack, name, workdir, partitions=PARTITIONS)  # the worker's default settings
    settings: Settings = scenario.settings()
    topic = settings.sync_topic

    print(f"pre-loading {args.events} events into {topic} ...", flush=True)
    records = make_events(args.events)
    asyncio.run(create_topic(stack.kafka_bootstrap, topic))
    load_s = asyncio.run(produce(stack.kafka_bootstrap, topic, records))
    print(f"  produced in {load_s:.1f}s ({args.events / load_s:,.0f} events/s)", flush=True)

    baseline_table = f"{name}_baseline"
    base_store = HistoryStore.open(settings.clickhouse, baseline_table)
    base_store.ensure_schema()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    base_s = asyncio.run(baseline(stack.kafka_bootstrap, topic, base_store, args.events))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    base_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert count(base_store, baseline_table) == args.events
    base_rate = args.events / base_s
    print(f"baseline: {base_rate:,.0f} events/s ({base_s:.1f}s, CPU {base_cpu:.1f}s)", flush=True)

    worker = Worker(scenario, label="bench")
    store = scenario.history()
    started = time.perf_counter()
    worker.start(wait_ready=False)
    wait_for(lambda: worker.get("/healthz") is not None, 120, "worker web port", worker.log)
    wait_for(lambda: worker.metric("memory_sync_events_consumed_total") > 0, 120, "first event", worker.log)
    first = time.perf_counter()
    cpu_first = process_cpu_s(worker)
    wait_for(lambda: count(store, settings.history_table) >= args.events, 1800, "all rows", worker.log)
    done = time.perf_counter()
    memsync_cpu = process_cpu_s(worker) - cpu_first
    # The last batch's latencies are observed just after its rows land: wait for them, or they would
    # count in the steady window below (year-old timestamps, all in the +Inf bucket).
    wait_for(
        lambda: worker.metric("memory_sync_consume_latency_seconds_count") >= args.events,
        60,
        "latencies of the loaded events",
        worker.log,
    )
    memsync_s = done - first
    memsync_rate = args.events / memsync_s
    inserts = worker.metric("memory_sync_insert_batch_rows_count")
    rows_per_insert = worker.metric("memory_sync_insert_batch_rows_sum") / inserts if inserts else 0
    print(
        f"memsync: {memsync_rate:,.0f} events/s ({memsync_s:.1f}s from first event, worker CPU "
        f"{memsync_cpu:.1f}s, peak RSS {peak_rss_mib(worker):,.0f} MiB; start-up "
        f"{first - started:.1f}s), {rows_per_insert:,.0f} rows per insert",
        flush=True,
    )

    phases = {
        phase: worker.metric("memory_sync_batch_phase_seconds_sum", {"phase": phase})
        for phase in ("decode", "table", "clickhouse_lookup", "insert", "mark")
    }
    print("  time per phase (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)

    steady_events = int(args.steady_rate * args.steady_seconds)
    print(f"steady load: {args.steady_rate:,.0f} events/s for {args.steady_seconds:.0f}s ...", flush=True)
    latency = "memory_sync_consume_latency_seconds"
    before = worker.metric(f"{latency}_count")
    buckets_before = histogram_buckets(worker, latency)
    # Fresh events, each timestamped as it is sent, so the histogram measures send→insert.
    rng = random.Random(7)
    first_steady = args.events * 3
    asyncio.run(
        produce(
            stack.kafka_bootstrap,
            topic,
            lambda n: make_event(first_steady + n, rng, now_ms=True),
            rate=args.steady_rate,
            count=steady_events,
        )
    )
    wait_for(
        lambda: worker.metric(f"{latency}_count") - before >= steady_events,
        300,
        "steady events written",
        worker.log,
    )
    quantiles = quantiles_between(buckets_before, histogram_buckets(worker, latency), (0.5, 0.95, 0.99))
    worker.stop()
    for table_store, table in ((store, settings.history_table), (base_store, baseline_table)):
        table_store.query(f"DROP TABLE IF EXISTS {table}")
        table_store.close()

    ratio = memsync_rate / base_rate
    p50, p95, p99 = (quantiles.get(q, float("nan")) for q in (0.5, 0.95, 0.99))
    print(f"ratio memsync/baseline: {ratio:.2f} (target >= 0.6)")
    print(f"steady latency save->ClickHouse: p50 {p50:.3f}s p95 {p95:.3f}s p99 {p99:.3f}s (target p95 <= 1s)")
    print("\nRESULTS.md row:")
    print(
        f"| {time.strftime('%Y-%m-%d')} | {args.events:,} | {base_rate:,.0f} ev/s ({base_s:.1f} s) | "
        f"{memsync_rate:,.0f} ev/s ({memsync_s:.1f} s) | {ratio:.2f} | {rows_per_insert:,.0f} | "
        f"{args.steady_rate:,.0f} ev/s: p50 {p50:.2f} s, p95 {p95:.2f} s, p99 {p99:.2f} s |"
    )
    print(f"Machine: {machine()}")


if __name__ == "__main__":
    main()
