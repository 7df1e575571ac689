"""Shared machinery of the fault-injection suite: known events, a fast raw producer, the stack's
services, and the checks every scenario ends with (drained, exactly once, DLQ contents).

Everything here talks to the real servers. Events are built with the product's own identity, document
encoder and Avro codec, then sent with a raw aiokafka producer (MongoDB is not involved: these are sink
tests). The producer runs in a thread with its own event loop, so a test injects faults from its own
thread while production goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app import docjson
from app.codecs import encode_event
from app.history import HistoryStore
from app.identity import event_id_for, operation_for
from tests.conftest import ROOT, StackEnv
from tests.worker import Scenario, Worker, poll

SOAK = os.environ.get("MEMSYNC_SOAK") == "1"
STACK = ROOT / "scripts" / "stack"
COLLECTIONS = (("contexts", "context"), ("episodes", "episode"), ("facts", "fact"))
# Room for the > 1 MB poison record (the stack's broker takes up to 4 MiB).
MAX_REQUEST_BYTES = 3 * 1024 * 1024


def scaled(events: int) -> int:
    """Event count of a scenario: as given in CI, five times more in soak mode."""
    return events * 5 if SOAK else events


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message to send. `event_id` is None for poison (it must never reach ClickHouse)."""

    key: bytes
    value: bytes
    event_id: str | None
    kind: str = "good"


def event_value(
    collection: str, data_type: str, entity_id: str, version: int, ts_ms: int, pad: int = 0
) -> bytes:
    document = docjson.normalise(
        {
            "_id": entity_id,
            "version": version,
            "data_type": data_type,
            "n": version,
            "note": f"v{version}" + "." * pad,
        }
    )
    event = {
        "event_id": event_id_for(collection, entity_id, version),
        "entity_id": entity_id,
        "data_type": data_type,
        "operation": operation_for(version),
        "collection": collection,
        "timestamp": ts_ms,
        "data": docjson.encode(document),
        "metadata": None,
    }
    return encode_event(event, "avro")


def make_events(
    count: int, *, seed: int = 7, prefix: str = "ent", pad: int = 0, months: int = 1
) -> list[Message]:
    """`count` distinct events in a realistic order: entities with 1-3 versions and a few hot ones
    updated dozens of times, interleaved, each entity's versions in order (one partition per entity).
    `pad` adds that many bytes to every document; `months` spreads the timestamps over that many
    months back (the history table has one partition per data type and month)."""
    rng = random.Random(seed)
    versions: list[int] = []
    total = 0
    while total < count:
        n = rng.randint(20, 60) if rng.random() < 0.02 else rng.choice((1, 1, 1, 2, 2, 3))
        n = min(n, count - total)
        versions.append(n)
        total += n
    slots = [entity for entity, n in enumerate(versions) for _ in range(n)]
    rng.shuffle(slots)
    next_version = [1] * len(versions)
    base_ms = int(time.time() * 1000) - 3600_000
    messages = []
    for position, entity in enumerate(slots):
        version = next_version[entity]
        next_version[entity] += 1
        collection, data_type = COLLECTIONS[entity % len(COLLECTIONS)]
        entity_id = f"{prefix}-{entity}"
        ts_ms = base_ms + position - (position % months) * 31 * 86_400_000
        value = event_value(collection, data_type, entity_id, version, ts_ms, pad)
        messages.append(Message(entity_id.encode(), value, event_id_for(collection, entity_id, version)))
    return messages


def expected_ids(messages: Iterable[Message]) -> set[str]:
    return {m.event_id for m in messages if m.event_id is not None}


def interleave(messages: Sequence[Message], copies: int, *, seed: int = 11) -> list[Message]:
    """Every message `copies` times, shuffled over the whole run: copies of one event land far apart,
    in different batches, mixed with other events' copies."""
    rng = random.Random(seed)
    out = [m for m in messages for _ in range(copies)]
    rng.shuffle(out)
    return out


def spread(good: Sequence[Message], extra: Sequence[Message], *, seed: int = 13) -> list[Message]:
    """`good` in order with `extra` inserted at random places."""
    rng = random.Random(seed)
    positions = sorted(rng.randrange(len(good) + 1) for _ in extra)
    out: list[Message] = []
    last = 0
    for position, message in zip(positions, extra, strict=True):
        out.extend(good[last:position])
        out.append(message)
        last = position
    out.extend(good[last:])
    return out


# ------------------------------------------------------------------ producing


class Producer(threading.Thread):
    """Sends messages to one topic from a thread, at `rate` messages/s (None: as fast as possible).

    At-least-once, like any real producer: a send that fails (broker restarting) is sent again, so a
    fault may put a message in the topic twice; the sink must cope with that too. `acked` counts
    messages the broker has confirmed.
    """

    def __init__(
        self, bootstrap: str, topic: str, messages: Sequence[Message], rate: float | None = None
    ) -> None:
        super().__init__(name=f"producer-{topic}", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.messages = list(messages)
        self.rate = rate
        self.acked = 0
        self.resent = 0
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._stop_event = threading.Event()

    @property
    def progress(self) -> float:
        return self.acked / max(1, len(self.messages))

    def run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:  # reported by join_checked
            self.error = exc

    def cancel(self) -> None:
        self._stop_event.set()

    def join_checked(self, timeout: float = 600.0) -> None:
        self.join(timeout)
        if self.is_alive():
            self.cancel()
            raise AssertionError(f"producer still running after {timeout:.0f}s ({self.acked} acked)")
        if self.error is not None:
            raise AssertionError(f"producer failed after {self.acked} acks: {self.error!r}")

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=20,
            max_batch_size=512 * 1024,
            max_request_size=MAX_REQUEST_BYTES,
            request_timeout_ms=30_000,
            retry_backoff_ms=200,
        )
        await self._retrying(producer.start)
        self.started_at = time.monotonic()
        chunk = 2000 if self.rate is None else max(1, int(self.rate / 10))
        try:
            for begin in range(0, len(self.messages), chunk):
                if self._stop_event.is_set():
                    return
                if self.rate is not None:
                    due = self.started_at + begin / self.rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self._send_chunk(producer, self.messages[begin : begin + chunk])
            self.finished_at = time.monotonic()
        finally:
            await producer.stop()

    async def _send_chunk(self, producer: AIOKafkaProducer, chunk: Sequence[Message]) -> None:
        pending = list(chunk)
        attempt = 0
        while pending and not self._stop_event.is_set():
            futures = []
            failed: list[Message] = []
            for message in pending:
                try:
                    futures.append((message, await producer.send(self.topic, message.value, key=message.key)))
                except Exception:
                    failed.append(message)
            results = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
            for (message, _), result in zip(futures, results, strict=True):
                if isinstance(result, BaseException):
                    failed.append(message)
                else:
                    self.acked += 1
            if failed:
                attempt += 1
                if attempt > 100:
                    raise RuntimeError(f"{len(failed)} messages still failing after 100 attempts")
                self.resent += len(failed)
                await asyncio.sleep(1.0)
            pending = failed

    @staticmethod
    async def _retrying(call: Callable[[], object]) -> None:
        for attempt in range(60):
            try:
                await call()  # type: ignore[misc]
                return
            except Exception:
                if attempt == 59:
                    raise
                await asyncio.sleep(1.0)


RUNNING_PRODUCERS: list[Producer] = []


def produce(bootstrap: str, topic: str, messages: Sequence[Message], rate: float | None = None) -> Producer:
    producer = Producer(bootstrap, topic, messages, rate)
    producer.start()
    RUNNING_PRODUCERS.append(producer)
    return producer


def cancel_producers() -> None:
    """Stop what a failed test left producing, so it does not load the next test's machine."""
    while RUNNING_PRODUCERS:
        producer = RUNNING_PRODUCERS.pop()
        producer.cancel()
        producer.join(35)


# ------------------------------------------------------------------ the stack's services


@dataclass
class StackControl:
    """`scripts/stack` on the stack the tests run against (same MEMSYNC_STACK_DIR, same ports)."""

    stack: StackEnv
    log: list[str] = field(default_factory=list)

    def __call__(self, command: str, service: str) -> float:
        started = time.monotonic()
        result = subprocess.run(
            [str(STACK), command, service],
            env={**os.environ, "MEMSYNC_STACK_DIR": str(self.stack.stack_dir)},
            capture_output=True,
            text=True,
            timeout=180,
        )
        took = time.monotonic() - started
        self.log.append(f"{time.strftime('%H:%M:%S')} stack {command} {service} ({took:.1f}s)")
        if result.returncode != 0:
            raise AssertionError(f"scripts/stack {command} {service} failed:\n{result.stderr[-2000:]}")
        return took

    def ensure_up(self) -> None:
        """Whatever a scenario did, leave Kafka and ClickHouse running (idempotent)."""
        self("up", "kafka")
        self("up", "clickhouse")


# ------------------------------------------------------------------ Kafka probes


def _run(coro_factory: Callable[[], object]) -> object:
    return asyncio.run(coro_factory())  # type: ignore[arg-type]


async def _stop_quietly(consumer: AIOKafkaConsumer) -> None:
    # aiokafka 0.14's coordinator close() awaits a task it has just cancelled: a consumer stopped soon
    # after start raises CancelledError from stop().
    with contextlib.suppress(asyncio.CancelledError):
        await consumer.stop()


async def _partitions(bootstrap: str, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of `topics`; raises if one does not exist (a check must never pass vacuously)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    partitions = []
    for topic in described:
        if topic["error_code"] or not topic["partitions"]:
            raise LookupError(f"topic {topic['topic']}: error {topic['error_code']}")
        partitions += [TopicPartition(topic["topic"], p["partition"]) for p in topic["partitions"]]
    return sorted(partitions)


async def _end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
    partitions = await _partitions(bootstrap, topics)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10_000
    )
    await consumer.start()
    try:
        return await consumer.end_offsets(partitions)
    finally:
        await _stop_quietly(consumer)


async def _committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items()}
    finally:
        await admin.close()


@dataclass(frozen=True)
class LagReport:
    lag: dict[str, int]  # per topic: sum over partitions of end offset - committed offset
    ends: dict[TopicPartition, int]

    @property
    def total(self) -> int:
        return sum(self.lag.values())


def group_lag(scenario: Scenario) -> LagReport | None:
    """The consumer group's lag on the sync and retry topics, from the broker (independent of any
    worker's own metrics); None while Kafka does not answer."""
    settings = scenario.settings()
    topics = [settings.sync_topic, settings.retry_topic]
    try:
        ends = _run(lambda: _end_offsets(scenario.stack.kafka_bootstrap, topics))
        committed = _run(lambda: _committed(scenario.stack.kafka_bootstrap, settings.consumer_group))
    except Exception:
        return None
    assert isinstance(ends, dict)
    assert isinstance(committed, dict)
    lag: dict[str, int] = {topic: 0 for topic in topics}
    for tp, end in ends.items():
        done = committed.get(tp, -1)
        lag[tp.topic] += end - max(done, 0)
    return LagReport(lag, ends)


async def _read_all(bootstrap: str, topic: str) -> list:
    partitions = await _partitions(bootstrap, [topic])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=MAX_REQUEST_BYTES,
        fetch_max_bytes=4 * MAX_REQUEST_BYTES,
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + 60
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end offsets {ends}")
            batch = await consumer.getmany(timeout_ms=1000)
            for tp_records in batch.values():
                records.extend(r for r in tp_records if r.offset < ends[TopicPartition(r.topic, r.partition)])
        return records
    finally:
        await _stop_quietly(consumer)


def read_topic(scenario: Scenario, topic: str) -> list:
    """Every record of `topic` from the beginning, with a plain consumer (no group)."""
    return _run(lambda: _read_all(scenario.stack.kafka_bootstrap, topic))  # type: ignore[return-value]


def dlq_records(scenario: Scenario) -> list:
    return read_topic(scenario, scenario.settings().dlq_topic)


# ------------------------------------------------------------------ ClickHouse checks


class History:
    """Read-only view of the scenario's history table; None answers while ClickHouse is down.

    `install_audit()` adds a materialized view that copies the event_id of every row ever inserted
    into a plain MergeTree table. The history table is a ReplacingMergeTree: a background merge can
    collapse a doubled row before the final count() sees it, so the audit table is what proves that
    no row was ever inserted twice.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.table = scenario.settings().history_table
        self.audit = f"{self.table}_audit"
        self.store: HistoryStore = scenario.history()

    def install_audit(self) -> None:
        self.store.ensure_schema()  # the worker's own CREATE TABLE IF NOT EXISTS then finds it
        self.store.query(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {self.audit} ENGINE = MergeTree ORDER BY event_id "
            f"AS SELECT event_id FROM {self.table}"
        )

    def query(self, sql: str) -> list[tuple] | None:
        try:
            return self.store.query(sql)
        except Exception:
            return None

    def count(self) -> int | None:
        rows = self.query(f"SELECT count() FROM {self.table}")
        return int(rows[0][0]) if rows else None

    def counts(self) -> tuple[int, int]:
        """(count(), uniqExact(event_id)) without FINAL: what is physically in the table."""
        rows = self.query(f"SELECT count(), uniqExact(event_id) FROM {self.table}")
        assert rows is not None, "ClickHouse did not answer"
        return int(rows[0][0]), int(rows[0][1])

    def event_ids(self) -> list[str]:
        rows = self.query(f"SELECT event_id FROM {self.table}")
        assert rows is not None, "ClickHouse did not answer"
        return [r[0] for r in rows]

    def close(self) -> None:
        self.store.close()


def assert_audit_clean(history: History, expected: set[str], *, exact: bool = True) -> None:
    """No event_id was ever inserted twice (whatever merges did since), and only expected ids were.
    `exact`: every expected id was inserted, too. Not exact after a ClickHouse kill -9, which can
    land a history block without its audit copy (the view is written after the table)."""
    rows = history.query(f"SELECT count(), uniqExact(event_id) FROM {history.audit}")
    assert rows is not None, "ClickHouse did not answer (or the audit view is missing)"
    inserted, unique = int(rows[0][0]), int(rows[0][1])
    assert inserted == unique, f"{inserted - unique} rows were inserted twice (audit: {inserted} inserts)"
    ids = {r[0] for r in history.query(f"SELECT DISTINCT event_id FROM {history.audit}") or []}
    assert ids <= expected, f"{len(ids - expected)} unexpected ids inserted"
    if exact:
        assert unique == len(expected), f"audit holds {unique} ids, expected {len(expected)}"


def assert_exactly_once(history: History, expected: set[str]) -> None:
    """count() == uniqExact(event_id) == len(expected), without FINAL, and the very same ids."""
    count, unique = history.counts()
    occurrences = Counter(history.event_ids())
    seen = set(occurrences)
    doubled = sorted(i for i, n in occurrences.items() if n > 1)
    missing = expected - seen
    foreign = seen - expected
    summary = (
        f"count()={count} uniqExact={unique} expected={len(expected)}; "
        f"{len(missing)} lost (e.g. {sorted(missing)[:3]}), {len(doubled)} doubled (e.g. {doubled[:3]}), "
        f"{len(foreign)} unexpected"
    )
    assert (count, unique) == (len(expected), len(expected)), summary
    assert not missing, summary
    assert not foreign, summary


# ------------------------------------------------------------------ workers


COUNTERS = {
    "consumed": ("memory_sync_events_consumed_total", None),
    "inserted": ("memory_sync_rows_inserted_total", None),
    "dup_batch": ("memory_sync_duplicate_events_skipped_total", {"layer": "batch"}),
    "dup_table": ("memory_sync_duplicate_events_skipped_total", {"layer": "table"}),
    "dup_clickhouse": ("memory_sync_duplicate_events_skipped_total", {"layer": "clickhouse"}),
    "dlq": ("memory_sync_dlq_events_total", None),
    "sink_retries": ("memory_sync_sink_retries_total", None),
}


class FaultWorker(Worker):
    """A worker that can be restarted under the same label (same data dir, same log file), and whose
    counters are summed over its incarnations (read just before each kill or stop)."""

    def __init__(self, *args: object, **kwargs: str) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.starts = 0
        self._banked = False
        self._past: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)

    def counters(self) -> dict[str, float]:
        """This incarnation's counters (zeros when it does not answer)."""
        out = {}
        for key, (name, labels) in COUNTERS.items():
            try:
                out[key] = self.metric(name, labels)
            except AssertionError:
                out[key] = 0.0
        return out

    def lifetime(self) -> dict[str, float]:
        now = self.counters() if self.alive() and not self._banked else dict.fromkeys(COUNTERS, 0.0)
        return {key: self._past[key] + now[key] for key in COUNTERS}

    def _bank(self) -> None:
        if self.alive() and not self._banked:
            for key, value in self.counters().items():
                self._past[key] += value
            self._banked = True

    def kill(self) -> None:
        self._bank()
        super().kill()

    def stop(self, timeout: float = 60.0) -> None:
        self._bank()
        super().stop(timeout)

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> FaultWorker:
        # The log is appended to across restarts: only a "Worker ready" written by this start counts.
        offset = len(self.log())
        super().start(wait_ready=False)
        self.starts += 1
        self._banked = False
        if wait_ready:
            wait_until(
                lambda: self.get("/healthz") is not None and "Worker ready" in self.log()[offset:],
                timeout,
                f"worker {self.label} ready (start #{self.starts})",
                [self],
            )
        return self

    def restart(self, timeout: float = 120.0) -> float:
        started = time.monotonic()
        self.start(timeout=timeout)
        return time.monotonic() - started


# ------------------------------------------------------------------ waiting


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    workers: Sequence[Worker] = (),
    interval: float = 0.5,
) -> object:
    result = poll(condition, timeout, interval)
    if result:
        return result
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{log_tails(workers)}")


def log_tails(workers: Sequence[Worker], lines: int = 30) -> str:
    out = ""
    for worker in workers:
        out += f"\n--- worker {worker.label} (alive={worker.alive()}), last log lines ---\n"
        out += "\n".join(worker.log().splitlines()[-lines:])
    return out


def wait_drained(
    scenario: Scenario,
    history: History,
    expected_rows: int,
    *,
    timeout: float = 300.0,
    workers: Sequence[Worker] = (),
    settle_s: float = 3.0,
) -> float:
    """Until the group has committed everything on the sync and retry topics, ClickHouse holds at least
    `expected_rows`, and neither moved for `settle_s` (nothing more arriving). Returns the monotonic time
    the drained state was first seen."""
    deadline = time.monotonic() + timeout
    first_seen: float | None = None
    last: tuple[object, ...] | None = None
    state = "nothing yet"
    while time.monotonic() < deadline:
        report = group_lag(scenario)
        rows = history.count()
        state = f"lag={report.lag if report else 'kafka down'} rows={rows}/{expected_rows}"
        if os.environ.get("MEMSYNC_FAULTS_DEBUG"):
            print(f"{time.strftime('%H:%M:%S')} drain: {state}", flush=True)
        if report is not None and report.total == 0 and rows is not None and rows >= expected_rows:
            snapshot = (tuple(sorted(report.ends.items())), rows)
            if snapshot == last and first_seen is not None:
                if time.monotonic() - first_seen >= settle_s:
                    return first_seen
            else:
                first_seen = time.monotonic()
                last = snapshot
        else:
            first_seen, last = None, None
        time.sleep(1.0)
    raise AssertionError(f"not drained within {timeout:.0f}s: {state}{log_tails(workers)}")


def assert_no_dead_letters(scenario: Scenario) -> None:
    records = dlq_records(scenario)
    assert not records, f"{len(records)} unexpected DLQ records, e.g. headers {records[0].headers}"


def assert_no_errors_logged(worker: Worker, allowed: Sequence[str] = ()) -> None:
    """No traceback and no crash in the worker log (apart from `allowed` substrings)."""
    bad = [
        line
        for line in worker.log().splitlines()
        if ("Traceback" in line or "CRITICAL" in line) and not any(a in line for a in allowed)
    ]
    assert not bad, f"worker {worker.label} logged errors: {bad[:5]}"


# ------------------------------------------------------------------ measurements


MEASUREMENTS: list[str] = []


def measure(text: str) -> None:
    """A number for docs/guarantees.md, printed in the pytest summary."""
    MEASUREMENTS.append(text)


@dataclass
class Timer:
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started
