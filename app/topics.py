"""Topic declarations: the consumer reads raw bytes (decoding is ours, so poison is routed, not fatal);
producers send `MemorySyncEvent` records through the configured codec.

`internal=True` makes the worker create these topics at start (Faust only creates internal topics,
and the brokers memsync targets have topic auto-creation off)."""

from __future__ import annotations

from app import app, settings
from app.factory import event_topic

# Consumed by agents.sync. Keyed by entity_id: per-entity order, and every retry of an event lands on
# the partition whose idempotency state has seen it.
sync_events = app.topic(
    settings.sync_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=settings.topic_partitions,
    internal=True,
)

# The same topic, for producers of records.
sync_events_out = event_topic(app, settings)

dlq_events = app.topic(
    settings.dlq_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=settings.topic_partitions,
    retention=settings.dlq_retention_ms / 1000.0,
    config={"retention.ms": str(settings.dlq_retention_ms)},
    internal=True,
)

# Record-level failures waiting for their next attempt (agents/retry.py). Same partition count and
# partition number as the source, so a retried event meets the idempotency state that has seen it.
retry_events = app.topic(
    settings.retry_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=settings.topic_partitions,
    config={"retention.ms": str(settings.dlq_retention_ms)},
    internal=True,
)
