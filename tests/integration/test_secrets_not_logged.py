"""A worker given known secrets never shows them: not in its log (at DEBUG), not on any page it serves,
not when it fails.

The worker talks SASL_SSL to this module's own broker (tests/kafka_secure_broker.py) with a password
in the environment, and is pointed at a MongoDB and a ClickHouse that are not there, with credentials,
so the failure paths (readiness probes, sink retries, connection errors) run and log.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from aiokafka import AIOKafkaProducer

from app.codecs import encode_event
from app.kafka_clients import kafka_client_kwargs, start_client
from app.settings import Settings
from tests.kafka_secure_broker import (
    HOST,
    ROOT,
    SecureBroker,
    free_port,
    http_get,
    running_secure_broker,
    start_worker,
    stop_process,
)

pytestmark = pytest.mark.integration

CLICKHOUSE_PASSWORD = "chSecret" + uuid.uuid4().hex[:12]
MONGO_PASSWORD = "mongoSecret" + uuid.uuid4().hex[:12]
WRONG_KAFKA_PASSWORD = "wrongKafkaSecret" + uuid.uuid4().hex[:12]

# The worker's own view of its routes: the app as `faust worker` builds it (autodiscovery, then the web
# server's blueprints), so a page added later is fetched by this test without editing it.
ROUTES_PROBE = """
import json
from app import app
app.discover()
app.web.init_server()
paths = {
    route.resource.canonical
    for route in app.web.web_app.router.routes()
    if route.method in ("GET", "*") and route.resource is not None
}
print(json.dumps(sorted(paths)))
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with running_secure_broker(tmp_path_factory.mktemp("secrets-kafka")) as running:
        yield running


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret)}


def _assert_no_secret(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        for form in _forms(secret):
            index = text.find(form)
            assert index < 0, f"secret leaked into {where}: ...{text[max(0, index - 200):index + 80]}..."


def _secret_env(broker: SecureBroker, workdir: Path, mechanism: str, **overrides: str) -> dict[str, str]:
    group = f"secrets-{uuid.uuid4().hex[:8]}"
    secret_env = {
        "KAFKA_SASL_MECHANISM": mechanism,
        # Straight in the environment, not in a file: the most exposed way to pass it.
        "KAFKA_SASL_PASSWORD_FILE": "",
        "KAFKA_SASL_PASSWORD": broker.password,
        "CLICKHOUSE_URL": f"clickhouse://memsync@{HOST}:{free_port()}/default",
        "CLICKHOUSE_PASSWORD": CLICKHOUSE_PASSWORD,
        "MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}@{HOST}:{free_port()}/memory?authSource=admin",
        "SINK_BACKOFF_MAX_SECONDS": "1",
        "SINK_BATCH_WITHIN_SECONDS": "0.2",
    }
    return broker.worker_env(workdir, group, **{**secret_env, **overrides})


def _routes(env: dict[str, str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", ROUTES_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    routes = json.loads(result.stdout.strip().splitlines()[-1])
    # Placeholders ({name}, {key}) get a value: the page should answer something, even an error.
    return [re.sub(r"\{[^}]+\}", "x", route) for route in routes]


def _send_events(settings: Settings) -> None:
    """One valid event (reaches the sink, which cannot reach ClickHouse) and one poison message."""
    event = {
        "event_id": uuid.uuid4().hex,
        "entity_id": "doc-1",
        "data_type": "context",
        "operation": "INSERT",
        "collection": "contexts",
        "timestamp": int(time.time() * 1000),
        "data": json.dumps({"_id": "doc-1", "text": "hello"}),
        "metadata": None,
    }

    async def send() -> None:
        producer = AIOKafkaProducer(acks="all", **kafka_client_kwargs(settings))
        await start_client(producer, settings)
        try:
            payload = encode_event(event, settings.codec)
            await producer.send_and_wait(settings.sync_topic, payload, key=b"doc-1")
            await producer.send_and_wait(settings.sync_topic, b"\x00not an event", key=b"doc-2")
        finally:
            await producer.stop()

    asyncio.run(asyncio.wait_for(send(), 60))


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_running_worker_shows_no_secret_in_log_or_pages(broker, tmp_path, mechanism):
    env = _secret_env(broker, tmp_path, mechanism)
    secrets = [broker.password, CLICKHOUSE_PASSWORD, MONGO_PASSWORD]
    log = tmp_path / "worker.log"
    port = int(env["WEB_PORT"])
    routes = _routes(env)
    assert "/healthz" in routes
    process = start_worker(env, log, loglevel="debug")
    pages: dict[str, list[tuple[int, bytes]]] = {route: [] for route in routes}
    try:
        deadline = time.monotonic() + 60
        while http_get(port, "/healthz") is None:
            assert process.poll() is None, f"worker exited:\n{log.read_text(errors='replace')[-4000:]}"
            assert time.monotonic() < deadline, f"no /healthz:\n{log.read_text(errors='replace')[-4000:]}"
            time.sleep(0.5)
        _send_events(Settings.from_env(env))
        # Several rounds: readiness probes and sink retries fail against the absent servers meanwhile.
        for _ in range(3):
            for route in routes:
                answer = http_get(port, route)
                if answer is not None:
                    pages[route].append(answer)
            time.sleep(2)
    finally:
        # A worker whose sink is waiting for ClickHouse does not finish stopping (it waits for the
        # in-flight batch); what it logs while it tries is enough here.
        stop_process(process, timeout=8)
    output = log.read_text(errors="replace")

    _assert_no_secret(output, secrets, "the worker log")
    for route, answers in pages.items():
        for status, body in answers:
            _assert_no_secret(body.decode(errors="replace"), secrets, f"GET {route} ({status})")

    # The test saw what it claims to have checked.
    assert any(status == 200 for status, _ in pages["/healthz"])
    assert all(pages[route] for route in routes), {route: len(a) for route, a in pages.items()}
    assert "SaslAuthenticateRequest" in output, "DEBUG logging of the SASL exchange was not exercised"
    assert "[DEBUG]" in output


def test_failing_worker_shows_no_secret(broker, tmp_path):
    env = _secret_env(broker, tmp_path, "SCRAM-SHA-512", KAFKA_SASL_PASSWORD=WRONG_KAFKA_PASSWORD)
    log = tmp_path / "worker.log"
    process = start_worker(env, log, loglevel="debug")
    try:
        process.wait(45)
    finally:
        code = stop_process(process)
    output = log.read_text(errors="replace")
    assert code != 0
    assert "SaslAuthenticationFailed" in output
    _assert_no_secret(output, [WRONG_KAFKA_PASSWORD, broker.password, CLICKHOUSE_PASSWORD, MONGO_PASSWORD],
                      "the failing worker's log")


@pytest.mark.parametrize(
    "overrides",
    [
        {"MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}@{HOST}:99999/"},
        {"CLICKHOUSE_URL": f"clickhouse://memsync:{CLICKHOUSE_PASSWORD}@{HOST}:9000/default"},
        {"KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "KAFKA_SSL_CA_FILE": ""},
    ],
    ids=["bad-mongodb-uri", "password-in-clickhouse-url", "sasl-password-without-sasl"],
)
def test_worker_refusing_its_configuration_shows_no_secret(broker, tmp_path, overrides):
    env = _secret_env(broker, tmp_path, "SCRAM-SHA-512", **overrides)
    result = subprocess.run(
        [str(Path(sys.executable).with_name("faust")), "-A", "app", "worker", "-l", "debug"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "memsync: invalid configuration:" in result.stderr
    _assert_no_secret(result.stdout + result.stderr, [broker.password, CLICKHOUSE_PASSWORD, MONGO_PASSWORD],
                      "the refused worker's output")
