"""Kafka security against a real broker: SASL_SSL (SCRAM/PLAIN), SSL with client certificates and
SASL_PLAINTEXT, as configured through memsync's environment variables.

The broker is this module's own (tests/kafka_secure_broker.py), not the local stack's PLAINTEXT one:
self-signed CA generated here, SCRAM users created with Kafka's StorageTool, stopped at the end.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError

from app.factory import create_app
from app.kafka_clients import KafkaConnectError, kafka_client_kwargs, start_client
from app.producer import UnifiedMemoryClient
from app.settings import Settings
from tests.kafka_secure_broker import (
    SecureBroker,
    http_get,
    running_secure_broker,
    start_worker,
    stop_process,
)
from tests.worker import Scenario, Worker, wait_for

pytestmark = pytest.mark.integration

E2E_DOCUMENTS = 200

WRONG_PASSWORD_REASON = (
    "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with running_secure_broker(tmp_path_factory.mktemp("secure-kafka")) as running:
        yield running


def _no_sasl(**env: str) -> dict[str, str]:
    """Overrides that unset the SASL variables of `SecureBroker.memsync_env`."""
    return {"KAFKA_SASL_MECHANISM": "", "KAFKA_SASL_USERNAME": "", "KAFKA_SASL_PASSWORD_FILE": "", **env}


def _settings(broker: SecureBroker, **overrides: str) -> Settings:
    return Settings.from_env(broker.memsync_env(**overrides))


async def _list_topics(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(request_timeout_ms=10_000, **kafka_client_kwargs(settings))
    try:
        await asyncio.wait_for(start_client(admin, settings), 30)
        return list(await admin.list_topics())
    finally:
        await admin.close()


def _connect_error(settings: Settings) -> str:
    with pytest.raises(KafkaConnectError) as caught:
        asyncio.run(_list_topics(settings))
    return str(caught.value)


def _run_worker_to_exit(env: dict[str, str], log: Path, timeout: float = 45.0) -> tuple[int | None, str]:
    process = start_worker(env, log)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        code = stop_process(process)
    return code, log.read_text(errors="replace")


# ---------------------------------------------------------------- what works


@pytest.mark.parametrize(
    ("listener", "overrides"),
    [
        ("sasl_ssl", {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}),
        ("sasl_ssl", {"KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}),
        ("sasl_ssl", {"KAFKA_SASL_MECHANISM": "PLAIN"}),
        ("sasl_plaintext", {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SSL_CA_FILE": "",
                            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}),
        ("ssl", _no_sasl(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CERT_FILE="{client_cert}",
                         KAFKA_SSL_KEY_FILE="{client_key}")),
    ],
    ids=["SASL_SSL-SCRAM-SHA-512", "SASL_SSL-SCRAM-SHA-256", "SASL_SSL-PLAIN", "SASL_PLAINTEXT-SCRAM-SHA-256",
         "SSL-client-certificate"],
)
def test_every_protocol_connects_with_plain_clients(broker, listener, overrides):
    port = {"sasl_ssl": broker.sasl_ssl_port, "ssl": broker.ssl_port,
            "sasl_plaintext": broker.sasl_plaintext_port}[listener]
    files = {"client_cert": str(broker.pki.client_cert), "client_key": str(broker.pki.client_key)}
    env = {key: value.format(**files) for key, value in overrides.items()}
    settings = _settings(broker, KAFKA_BOOTSTRAP_SERVERS=broker.address(port), **env)
    assert settings.kafka_security.protocol == env.get("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    # Metadata came back: the broker accepted the connection and the authentication.
    assert isinstance(asyncio.run(_list_topics(settings)), list)


def test_faust_app_produces_and_plain_consumer_reads_over_sasl_ssl(broker, tmp_path):
    topic_name = f"secure-{uuid.uuid4().hex[:10]}"
    settings = _settings(broker, MEMSYNC_DATA_DIR=str(tmp_path), KAFKA_CONSUMER_GROUP=topic_name)
    faust_app = create_app(settings)
    records = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]

    async def round_trip() -> list[tuple[bytes, bytes]]:
        await asyncio.wait_for(faust_app.maybe_start_producer(), 30)
        try:
            topic = faust_app.topic(
                topic_name, key_type=bytes, value_type=bytes, key_serializer="raw",
                value_serializer="raw", partitions=1, replicas=1,
            )
            await topic.maybe_declare()
            for key, value in records:
                await (await topic.send(key=key, value=value))
            await faust_app.producer.flush()
        finally:
            await faust_app.producer.stop()
        consumer = AIOKafkaConsumer(
            topic_name, auto_offset_reset="earliest", enable_auto_commit=False,
            **kafka_client_kwargs(settings),
        )
        await asyncio.wait_for(start_client(consumer, settings), 30)
        received: list[tuple[bytes, bytes]] = []
        try:
            deadline = time.monotonic() + 30
            while len(received) < len(records) and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=1000)).values():
                    received.extend((r.key, r.value) for r in batch)
        finally:
            await consumer.stop()
        return received

    assert asyncio.run(round_trip()) == records


def test_plain_producer_and_admin_work_over_sasl_ssl(broker):
    settings = _settings(broker)
    topic_name = f"plain-{uuid.uuid4().hex[:10]}"

    async def produce() -> int:
        admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
        await start_client(admin, settings)
        try:
            await admin.create_topics([NewTopic(topic_name, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
        await start_client(producer, settings)
        try:
            metadata = await producer.send_and_wait(topic_name, b"value", key=b"key")
        finally:
            await producer.stop()
        return metadata.offset

    assert asyncio.run(produce()) == 0


def _group_members(settings: Settings, group: str) -> tuple[str, int]:
    async def describe() -> tuple[str, int]:
        admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
        await start_client(admin, settings)
        try:
            [response] = await admin.describe_consumer_groups([group])
        except GroupCoordinatorNotAvailableError:
            return "(the broker is still creating __consumer_offsets)", 0
        finally:
            await admin.close()
        _error, _group, state, _protocol_type, _protocol, members, *_ = response.groups[0]
        return state, len(members)

    return asyncio.run(describe())


def test_worker_joins_its_group_over_sasl_ssl(broker, tmp_path):
    group = f"secure-worker-{uuid.uuid4().hex[:8]}"
    env = broker.worker_env(tmp_path, group)
    log = tmp_path / "worker.log"
    process = start_worker(env, log)
    settings = _settings(broker)
    try:
        deadline = time.monotonic() + 60
        state, members, health = "", 0, None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"worker exited:\n{log.read_text(errors='replace')[-4000:]}"
            state, members = _group_members(settings, group)
            health = http_get(int(env["WEB_PORT"]), "/healthz")
            if state == "Stable" and members >= 1 and health is not None:
                break
            time.sleep(1)
        tail = log.read_text(errors="replace")[-4000:]
        assert (state, members) == ("Stable", 1), f"group {group} is {state} with {members} members\n{tail}"
        assert health is not None, f"/healthz did not answer\n{tail}"
        assert health[0] == 200, f"/healthz answered {health}\n{tail}"
    finally:
        stop_process(process, timeout=30)
    assert "SaslAuthenticationFailed" not in log.read_text(errors="replace")


def test_saves_reach_clickhouse_over_sasl_ssl(broker, stack, unique_name, tmp_path):
    """The whole real-time path with Kafka over SASL_SSL (SCRAM-SHA-512, private CA): documents saved
    through UnifiedMemoryClient reach the shared stack's ClickHouse through a worker, exactly once."""
    scenario = Scenario(stack, unique_name, tmp_path, partitions=1, extra_env=broker.memsync_env())
    settings = scenario.settings()
    assert settings.kafka_security.protocol == "SASL_SSL"
    assert settings.kafka_bootstrap_servers == (broker.sasl_ssl,)
    docs = [{"_id": f"secure-{i}", "n": i, "text": f"memory {i}"} for i in range(E2E_DOCUMENTS)]
    worker = Worker(scenario).start()
    try:
        client = UnifiedMemoryClient.from_settings(settings)

        async def save_all() -> list[str]:
            await asyncio.wait_for(client.start(), 30)
            try:
                results = [await client.save("facts", doc, "fact") for doc in docs]
            finally:
                await client.stop()
            return [result.event.event_id for result in results]

        event_ids = asyncio.run(save_all())
        assert len(set(event_ids)) == E2E_DOCUMENTS

        def counts() -> tuple[int, int]:
            store = scenario.history()
            try:
                ((count, unique),) = store.query(
                    f"SELECT count(), uniqExact(event_id) FROM {settings.history_table}"
                )
            finally:
                store.close()
            return int(count), int(unique)

        wait_for(lambda: counts()[0] >= E2E_DOCUMENTS, 120, f"{E2E_DOCUMENTS} history rows", worker.log)
        # A redelivered batch would show up a moment later: wait until the worker has nothing left.
        wait_for(
            lambda: worker.metric("memory_sync_events_consumed_total") >= E2E_DOCUMENTS
            and worker.metric("memory_sync_consumer_lag") == 0,
            60, "the worker to drain the sync topic", worker.log,
        )
        assert counts() == (E2E_DOCUMENTS, E2E_DOCUMENTS)
        # The events went through the secure broker (the stack's PLAINTEXT Kafka never saw the topic).
        assert settings.sync_topic in asyncio.run(_list_topics(settings))
    finally:
        worker.stop()
    log = worker.log()
    assert "SaslAuthenticationFailed" not in log
    assert broker.password not in log


# ---------------------------------------------------------------- what must fail, and how it reads


def test_wrong_password_fails_with_authentication_failed(broker, tmp_path):
    settings = _settings(broker, KAFKA_SASL_PASSWORD_FILE="", KAFKA_SASL_PASSWORD="not-the-password")
    message = _connect_error(settings)
    assert "SaslAuthenticationFailed" in message
    assert WRONG_PASSWORD_REASON in message
    assert "not-the-password" not in message
    assert "Failed authentication with /127.0.0.1" in broker.log_tail(400)


def test_worker_with_wrong_password_exits_naming_the_cause(broker, tmp_path):
    group = f"wrong-password-{uuid.uuid4().hex[:8]}"
    env = broker.worker_env(
        tmp_path, group, KAFKA_SASL_PASSWORD_FILE="", KAFKA_SASL_PASSWORD="not-the-password"
    )
    started = time.monotonic()
    code, output = _run_worker_to_exit(env, tmp_path / "worker.log")
    assert code not in (0, None), output[-3000:]
    assert time.monotonic() - started < 40
    assert f"[Error 58] SaslAuthenticationFailed: {WRONG_PASSWORD_REASON}" in output
    assert "not-the-password" not in output


def test_worker_with_untrusted_ca_exits_naming_the_cause(broker, tmp_path):
    group = f"untrusted-ca-{uuid.uuid4().hex[:8]}"
    env = broker.worker_env(tmp_path, group, KAFKA_SSL_CA_FILE=str(broker.pki.untrusted_ca_cert))
    started = time.monotonic()
    code, output = _run_worker_to_exit(env, tmp_path / "worker.log", timeout=60.0)
    assert code not in (0, None), output[-3000:]
    assert time.monotonic() - started < 60
    assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed" in output, output[-3000:]
    assert broker.password not in output


def test_untrusted_ca_fails_with_certificate_verify_failed(broker, tmp_path, caplog):
    settings = _settings(broker, KAFKA_SSL_CA_FILE=str(broker.pki.untrusted_ca_cert))
    message = _connect_error(settings)
    assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed" in message

    # The Faust app built from the same settings refuses the broker as well.
    faust_app = create_app(
        _settings(broker, KAFKA_SSL_CA_FILE=str(broker.pki.untrusted_ca_cert), MEMSYNC_DATA_DIR=str(tmp_path))
    )

    async def start() -> None:
        try:
            await asyncio.wait_for(faust_app.maybe_start_producer(), 30)
        finally:
            await faust_app.producer.stop()

    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(Exception, match="bootstrap"):
        asyncio.run(start())
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_system_trust_store_does_not_trust_a_private_ca(broker):
    settings = _settings(broker, KAFKA_SSL_CA_FILE="")
    assert "CERTIFICATE_VERIFY_FAILED" in _connect_error(settings)


@pytest.mark.parametrize(
    "overrides",
    [
        _no_sasl(KAFKA_SECURITY_PROTOCOL="PLAINTEXT", KAFKA_SSL_CA_FILE=""),
        {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SSL_CA_FILE": ""},
        _no_sasl(KAFKA_SECURITY_PROTOCOL="SSL"),
    ],
    ids=["PLAINTEXT", "SASL_PLAINTEXT", "SSL-without-SASL"],
)
def test_sasl_ssl_listener_rejects_plaintext_and_unauthenticated_clients(broker, overrides):
    message = _connect_error(_settings(broker, **overrides))
    assert "cannot connect to Kafka" in message
    assert "closed" in message or "Authentication" in message


def test_ssl_listener_requires_a_client_certificate(broker):
    settings = _settings(
        broker,
        KAFKA_BOOTSTRAP_SERVERS=broker.address(broker.ssl_port),
        **_no_sasl(KAFKA_SECURITY_PROTOCOL="SSL"),
    )
    assert "closed" in _connect_error(settings)
