"""memsync's Prometheus metrics, named exactly as the seed, on the registry Faust's sensor serves.

A worker serves them at /metrics (app.web). An application that only produces (UnifiedMemoryClient
outside a worker) exposes them with `prometheus_client.start_http_server(port)` or multiprocess mode;
see docs/operations.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

registry: CollectorRegistry = REGISTRY

# Latencies span a local round trip (ms) to a ClickHouse outage (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

events_published = Counter(
    "memory_sync_events_published_total",
    "MemorySyncEvents published to Kafka by UnifiedMemoryClient",
    ["topic"],
    registry=registry,
)
publish_latency = Histogram(
    "memory_sync_publish_latency_seconds",
    "Time from send() to the broker's acknowledgement of a MemorySyncEvent",
    buckets=LATENCY_BUCKETS,
    registry=registry,
)
publish_failures = Counter(
    "memory_sync_publish_failures_total",
    "MemorySyncEvents that could not be published after the MongoDB write (reconciliation repairs them)",
    registry=registry,
)
# The seed's two DLQ-rate counters carry no label of their own, so HighDLQRate's plain division
# `rate(dlq) / rate(consumed)` matches them one-to-one (same target labels); the breakdowns live in
# separate *_by_* counters.
events_consumed = Counter(
    "memory_sync_events_consumed_total",
    "MemorySyncEvents consumed from the sync topic (duplicates and poison included, retries not)",
    registry=registry,
)
events_consumed_by_topic = Counter(
    "memory_sync_events_consumed_by_topic_total",
    "MemorySyncEvents taken by the sink, by the topic they were read from (sync or retry)",
    ["topic"],
    registry=registry,
)
consume_latency = Histogram(
    "memory_sync_consume_latency_seconds",
    "Time from the event's timestamp (save) to its row being written in ClickHouse",
    buckets=LATENCY_BUCKETS,
    registry=registry,
)
consumer_lag = Gauge(
    "memory_sync_consumer_lag",
    "Broker high-water mark minus the group's committed offset, per assigned partition",
    ["topic", "partition"],
    registry=registry,
)
consumer_lag_refreshed = Gauge(
    "memory_sync_consumer_lag_refreshed_timestamp_seconds",
    "Unix time of the last successful refresh of memory_sync_consumer_lag (0 before the first); "
    "the lag gauges keep their last values when a refresh fails",
    registry=registry,
)
dlq_events = Counter(
    "memory_sync_dlq_events_total",
    "Events sent to the dead-letter topic",
    registry=registry,
)
dlq_events_by_class = Counter(
    "memory_sync_dlq_events_by_class_total",
    "Events sent to the dead-letter topic, by error class",
    ["error_class"],
    registry=registry,
)
duplicates_skipped = Counter(
    "memory_sync_duplicate_events_skipped_total",
    "Events skipped because their event_id was already written",
    ["layer"],
    registry=registry,
)
rows_inserted = Counter(
    "memory_sync_rows_inserted_total",
    "History rows inserted into ClickHouse, by source",
    ["source"],
    registry=registry,
)
insert_rows = Histogram(
    "memory_sync_insert_batch_rows",
    "Rows per ClickHouse insert",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000, 50000, 100000),
    registry=registry,
)
batch_phase = Histogram(
    "memory_sync_batch_phase_seconds",
    "Time the sink spends per batch in each phase: decode, table (idempotency lookup), "
    "clickhouse_lookup, insert (retries included), mark, route",
    ["phase"],
    buckets=LATENCY_BUCKETS,
    registry=registry,
)
stale_batches = Counter(
    "memory_sync_stale_batches_dropped_total",
    "Batches taken before a rebalance and dropped unwritten (their partitions' owners read them again)",
    registry=registry,
)
sink_waiting = Gauge(
    "memory_sync_sink_waiting",
    "1 while the sync agent holds a batch because ClickHouse is unavailable",
    registry=registry,
)
sink_retries = Counter(
    "memory_sync_sink_retries_total",
    "Retries of a held batch while ClickHouse is unavailable",
    registry=registry,
)
retries_scheduled = Counter(
    "memory_sync_retries_scheduled_total",
    "Record-level failures scheduled for a delayed retry, by attempt number",
    ["attempt"],
    registry=registry,
)
job_last_success = Gauge(
    "memory_sync_job_last_success_timestamp_seconds",
    "Unix time of the last successful run of a scheduled job",
    ["job_name"],
    registry=registry,
)
job_duration = Gauge(
    "memory_sync_job_last_duration_seconds",
    "Duration of the last run of a scheduled job",
    ["job_name"],
    registry=registry,
)
job_failures = Counter(
    "memory_sync_job_failures_total",
    "Failed runs of a scheduled job",
    ["job_name"],
    registry=registry,
)
reconcile_rows_repaired = Counter(
    "memory_sync_reconcile_rows_repaired_total",
    "History rows inserted by reconciliation because ClickHouse lacked them",
    ["collection"],
    registry=registry,
)
retention_rows_removed = Counter(
    "memory_sync_retention_rows_removed_total",
    "History rows removed by retention, by data type",
    ["data_type"],
    registry=registry,
)


def observe_many(histogram: Histogram, amounts: Iterable[float]) -> None:
    """`histogram.observe(a)` for every amount, with one increment per bucket instead of two locked
    increments per value: a 20,000-event batch costs ~2 ms less. Uses prometheus_client's own bucket
    bounds and values, so the exposition is the same as with observe()."""
    bounds = histogram._upper_bounds  # ascending, ending with +Inf
    counts = [0] * len(bounds)
    total = 0.0
    for amount in amounts:
        total += amount
        counts[bisect_left(bounds, amount)] += 1  # first bound >= amount, as observe() picks
    if not any(counts):
        return
    histogram._sum.inc(total)
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)


# Every error class app/sink.py and app/deadletter.py give a Failure, created at 0 so that rate() and
# increase() see the first dead letter of a class.
DLQ_ERROR_CLASSES = ("undecodable", "too_large", "invalid_data", "rejected_by_clickhouse")
for _error_class in DLQ_ERROR_CLASSES:
    dlq_events_by_class.labels(_error_class)


def record_consumed(topic: str, count: int, *, sync: bool) -> None:
    """Count events the sink took from `topic`. Only the sync topic's count in
    memory_sync_events_consumed_total: a retried record passes through the retry topic up to three
    times but can reach the DLQ once, so counting retries would shrink HighDLQRate's ratio."""
    events_consumed_by_topic.labels(topic).inc(count)
    if sync:
        events_consumed.inc(count)


def record_dead_letter(error_class: str) -> None:
    dlq_events.inc()
    dlq_events_by_class.labels(error_class).inc()
