"""Scenario 7: poison records mixed into the stream, every kind the sink knows:

- undecodable (straight to the DLQ, retrying cannot help): random bytes, a truncated record, a record
  written with another schema (a field of the wrong type, a missing field, an unknown operation);
- retried 1 s, 2 s, 4 s on the retry topic, then the DLQ: invalid JSON in `data`, a mistyped
  `version` in the document, a value ClickHouse would refuse (a timestamp outside DateTime, refused by
  app.history.row_problem), and a record over 1 MB.

Every poison record ends in the DLQ exactly once, with the right `memsync.error_class`, the original
key and bytes, and headers pointing back at the source record; nothing else does. The good records
around them are written exactly once, at >= 0.9x the throughput of a clean run in the same test.
"""

from __future__ import annotations

import copy
import io
import json
import random

import fastavro
import pytest

from app.codecs import SCHEMA_PATH, encode_event
from app.identity import event_id_for
from tests.faults.harness import (
    SOAK,
    FaultWorker,
    Message,
    Timer,
    assert_audit_clean,
    assert_exactly_once,
    dlq_records,
    expected_ids,
    make_events,
    measure,
    produce,
    read_topic,
    spread,
    wait_drained,
    wait_until,
)

pytestmark = pytest.mark.timeout(1200 if SOAK else 420)

RETRY_DELAYS_S = (1.0, 2.0, 4.0)
MIN_RATIO = 0.9


def _avro(schema_edit, record: dict) -> bytes:
    schema = copy.deepcopy(json.loads(SCHEMA_PATH.read_text()))
    schema_edit(schema)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return buffer.getvalue()


def _field(schema: dict, name: str) -> dict:
    return next(f for f in schema["fields"] if f["name"] == name)


def _record(key: str, **changes: object) -> dict:
    record = {
        "event_id": event_id_for("contexts", key, 1),
        "entity_id": key,
        "data_type": "context",
        "operation": "INSERT",
        "collection": "contexts",
        "timestamp": 1_700_000_000_000,
        "data": f'{{"_id":"{key}","version":1}}',
        "metadata": None,
    }
    record.update(changes)
    return record


def poison_kinds() -> dict[str, tuple[str, object]]:
    """kind -> (expected error class, builder(key) -> bytes)."""
    enum_plus = {"type": "enum", "name": "Operation", "symbols": ["INSERT", "UPDATE", "DELETE", "UPSERT"]}
    return {
        "random_bytes": ("undecodable", lambda key: random.Random(key).randbytes(64)),
        "truncated_avro": ("undecodable", lambda key: encode_event(_record(key), "avro")[:-7]),
        "wrong_field_type": (
            "undecodable",
            lambda key: _avro(
                lambda s: _field(s, "timestamp").update(type="string"), _record(key, timestamp="now")
            ),
        ),
        "missing_field": (
            "undecodable",
            lambda key: _avro(
                lambda s: s.update(fields=[f for f in s["fields"] if f["name"] != "collection"]),
                {k: v for k, v in _record(key).items() if k != "collection"},
            ),
        ),
        "unknown_operation": (
            "undecodable",
            lambda key: _avro(
                lambda s: _field(s, "operation").update(type=enum_plus), _record(key, operation="UPSERT")
            ),
        ),
        "invalid_json_data": (
            "invalid_data",
            lambda key: encode_event(_record(key, data='{"version": 1,'), "avro"),
        ),
        "mistyped_version": (
            "invalid_data",
            lambda key: encode_event(_record(key, data='{"version":"seven"}'), "avro"),
        ),
        "rejected_value": (
            "rejected_by_clickhouse",
            lambda key: encode_event(_record(key, timestamp=-1), "avro"),
        ),
        "over_1mb": (
            "too_large",
            lambda key: encode_event(
                _record(key, data='{"version":1,"pad":"%s"}' % ("x" * 1_100_000)), "avro"
            ),
        ),
    }


def make_poison(per_kind: int, prefix: str = "poison") -> list[Message]:
    messages = []
    for kind, (_, build) in poison_kinds().items():
        count = min(per_kind, 2) if kind == "over_1mb" else per_kind
        for i in range(count):
            key = f"{prefix}-{kind}-{i}"
            messages.append(Message(key.encode(), build(key), None, kind))
    return messages


def timed_phase(scenario, history, worker, messages, target_rows: int) -> float:
    """Seconds from the start of production to `target_rows` rows in ClickHouse."""
    timer = Timer()
    producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, messages)
    wait_until(lambda: (history.count() or 0) >= target_rows, 300, f"{target_rows} rows", [worker], 0.05)
    took = timer.elapsed()
    producer.join_checked()
    return took


def test_poison_records_go_to_the_dlq_and_good_ones_flow(scenario, workers, history):
    history.install_audit()
    # Runs of 60,000 good events (~15 s each here): on 20,000 the run-to-run noise of a shared 2-core
    # machine was +-10 %, as large as the effect measured; at 60,000 it is +-4 %.
    size = 100_000 if SOAK else 60_000
    # Clean and poisoned runs alternate (clean, poisoned, clean, poisoned, clean) on one worker: both
    # kinds sit at the same mean position, so a drift (a growing table, merges, a neighbour's load)
    # weighs on both alike. Each run drains fully (retries included) before the next starts.
    plan = ["clean", "poisoned", "clean", "poisoned", "clean"]
    poison: list[Message] = []
    expected: set[str] = set()
    worker = FaultWorker(scenario)
    workers.append(worker)
    worker.start()
    timer = Timer()
    times: dict[str, list[float]] = {"clean": [], "poisoned": []}
    for run, kind in enumerate(plan):
        good = make_events(size, seed=run, prefix=f"r{run}")
        messages = good
        if kind == "poisoned":
            bad = make_poison(per_kind=25 if SOAK else 5, prefix=f"poison{run}")
            poison += bad
            messages = spread(good, bad, seed=run)
        expected |= expected_ids(good)
        times[kind].append(timed_phase(scenario, history, worker, messages, len(expected)))
        wait_drained(scenario, history, len(expected), workers=[worker])
    took = timer.elapsed()

    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)

    # The DLQ holds exactly the poison records, each once, as they were sent, with the right class.
    kinds = poison_kinds()
    by_key = {m.key: m for m in poison}
    dead = dlq_records(scenario)
    dead_keys = [r.key for r in dead]
    assert sorted(dead_keys) == sorted(by_key), (
        f"DLQ keys differ: missing {sorted(set(by_key) - set(dead_keys))[:5]}, "
        f"extra {sorted(set(dead_keys) - set(by_key))[:5]}, {len(dead_keys)} records for {len(by_key)}"
    )
    sync_topic = scenario.settings().sync_topic
    source = {(r.partition, r.offset): r for r in read_topic(scenario, sync_topic) if r.key in by_key}
    for record in dead:
        sent = by_key[record.key]
        headers = {k: v.decode() for k, v in record.headers}
        error_class, _ = kinds[sent.kind]
        assert record.value == sent.value, f"{sent.kind}: DLQ payload differs from the original bytes"
        assert headers["memsync.error_class"] == error_class, (sent.kind, headers)
        assert headers["memsync.error"], (sent.kind, headers)
        retried = error_class != "undecodable"
        assert int(headers["memsync.attempts"]) == (len(RETRY_DELAYS_S) + 1 if retried else 1), (
            sent.kind,
            headers,
        )
        waited_ms = int(headers["memsync.last_failure_ms"]) - int(headers["memsync.first_failure_ms"])
        assert waited_ms >= (sum(RETRY_DELAYS_S) * 1000 if retried else 0), (sent.kind, waited_ms)
        assert headers["memsync.source_topic"] == sync_topic
        original = source[(int(headers["memsync.source_partition"]), int(headers["memsync.source_offset"]))]
        assert original.key == record.key, sent.kind
        assert original.value == record.value, sent.kind
        assert headers["memsync.worker_id"] == worker.label
    counts = worker.lifetime()
    assert counts["dlq"] == len(poison)

    t_clean = sum(times["clean"]) / len(times["clean"])
    t_dirty = sum(times["poisoned"]) / len(times["poisoned"])
    ratio = t_clean / t_dirty  # good records per second: poisoned runs over clean runs
    per_class: dict[str, int] = {}
    for message in poison:
        per_class[kinds[message.kind][0]] = per_class.get(kinds[message.kind][0], 0) + 1
    measure(
        f"scenario 7 (poison: {len(poison)} records, {len(kinds)} kinds, {per_class}): all in the DLQ with "
        f"their class and original bytes; {size} good events per run took clean "
        f"{', '.join(f'{t:.1f}s' for t in times['clean'])}, poisoned "
        f"{', '.join(f'{t:.1f}s' for t in times['poisoned'])}: throughput ratio {ratio:.2f} "
        f"({size / t_dirty:.0f} vs {size / t_clean:.0f} events/s; limit {MIN_RATIO}); test {took:.0f}s"
    )
    assert ratio >= MIN_RATIO, f"good-record throughput with poison is {ratio:.2f}x a clean run's"
