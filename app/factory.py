"""Builds the Faust application from `Settings` (tests and tools build their own)."""

from __future__ import annotations

from datetime import UTC

import faust

from app import transport
from app.kafka_clients import kafka_ssl_context, redact_sasl_logging
from app.settings import KafkaSecurity, Settings


def kafka_credentials(security: KafkaSecurity) -> faust.types.auth.CredentialsT | None:
    """Faust credentials for KAFKA_SECURITY_PROTOCOL.

    Faust's SASLCredentials silently means SASL_PLAINTEXT unless it is given an SSL context, so
    SASL_SSL always passes one (tests/integration/test_kafka_security.py proves the broker sees TLS).
    """
    protocol = security.protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(kafka_ssl_context(security))
    redact_sasl_logging()
    return faust.SASLCredentials(
        username=security.sasl_username,
        password=security.sasl_password.value,
        mechanism=security.sasl_mechanism,
        ssl_context=kafka_ssl_context(security) if protocol == "SASL_SSL" else None,
    )


def create_app(settings: Settings) -> faust.App:
    # faust-streaming's aiokafka driver with two offset fixes and batch lanes (app/transport.py).
    brokers = ";".join(f"{transport.SCHEME}://{server}" for server in settings.kafka_bootstrap_servers)
    app = faust.App(
        settings.consumer_group,
        broker=brokers,
        broker_credentials=kafka_credentials(settings.kafka_security),
        autodiscover=["agents", "tables"],
        origin="app",
        store="rocksdb://",
        datadir=str(settings.data_dir),
        processing_guarantee="at_least_once",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, settings.sink_batch_max_events * 2),
        # Events are acked only once written; at shutdown the unwritten ones are simply redelivered,
        # so a stop must not wait for acks that a ClickHouse outage would withhold forever.
        stream_wait_empty=False,
        broker_commit_every=10_000,
        broker_commit_interval=2.0,
        consumer_max_fetch_size=settings.max_partition_fetch_bytes,
        producer_acks=-1,
        producer_max_request_size=max(1_048_576, settings.max_document_bytes * 4),
        producer_linger=0.005,
        timezone=UTC,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_router_enabled=settings.web_table_routes_enabled,
        web_tables_enabled=settings.web_table_routes_enabled,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
    )
    # The sync topic is read in whole fetches (app/lane.py); up to two batches wait in the lane.
    app.batch_lanes = (  # type: ignore[attr-defined]
        {settings.sync_topic: 2 * settings.sink_batch_max_events} if settings.enable_realtime_sync else {}
    )
    return app


def event_topic(app: faust.App, settings: Settings) -> faust.TopicT:
    """The sync topic for producers of `MemorySyncEvent` records, keyed by entity_id."""
    from app.records import MemorySyncEvent

    return app.topic(
        settings.sync_topic,
        key_type=bytes,
        value_type=MemorySyncEvent,
        key_serializer="raw",
        value_serializer=f"memsync_{settings.codec}",
        partitions=settings.topic_partitions,
    )
