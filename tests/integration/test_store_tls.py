"""TLS and credentials to ClickHouse and MongoDB, through memsync's own settings and clients, against
real servers started here (tests/secure_servers.py): ClickHouse 18.16 with `tcp_port_secure` and a
password user, FerretDB v1.24.2 (SQLite) with a TLS listener and SCRAM users.

The CA, the server certificate (127.0.0.1/localhost) and a second, untrusted CA are generated per run.
What must work: `clickhouses://` + CLICKHOUSE_PASSWORD_FILE + CLICKHOUSE_CA_FILE → HistoryStore
(schema, insert, query); `MONGODB_URI(_FILE)` with credentials and `tls=true&tlsCAFile=...` →
app.mongo.async_client (ping, insert, find). What must fail, quickly and legibly, without the password
in the message or the logs: an untrusted CA, the system trust store (which does not know the test CA),
a wrong password, a plaintext client on the TLS port (and TLS on the plaintext port).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from app.history import HistoryRow, HistoryStore, SinkUnavailable
from app.mongo import async_client
from app.settings import Settings, check_tls_files
from tests.secure_servers import (
    SecureClickHouse,
    SecureFerretDB,
    ServerPki,
    make_server_pki,
    running_secure_clickhouse,
    running_secure_ferretdb,
)

pytestmark = pytest.mark.integration

CERTIFICATE_VERIFY_FAILED = (
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"
)
WRONG_PASSWORD = "not-the-password-4c1f"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPki:
    return make_server_pki(tmp_path_factory.mktemp("store-tls-pki"))


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory: pytest.TempPathFactory, pki: ServerPki) -> Iterator[SecureClickHouse]:
    with running_secure_clickhouse(tmp_path_factory.mktemp("secure-clickhouse"), pki) as server:
        yield server


@pytest.fixture(scope="module")
def ferretdb(tmp_path_factory: pytest.TempPathFactory, pki: ServerPki) -> Iterator[SecureFerretDB]:
    with running_secure_ferretdb(tmp_path_factory.mktemp("secure-ferretdb"), pki) as server:
        yield server


@pytest.fixture(scope="module")
def misnamed_clickhouse(
    tmp_path_factory: pytest.TempPathFactory, pki: ServerPki
) -> Iterator[SecureClickHouse]:
    """Presents a certificate from the trusted CA, but for another host name."""
    home = tmp_path_factory.mktemp("misnamed-clickhouse")
    with running_secure_clickhouse(home, pki, wrong_name=True) as server:
        yield server


@pytest.fixture(scope="module")
def misnamed_ferretdb(tmp_path_factory: pytest.TempPathFactory, pki: ServerPki) -> Iterator[SecureFerretDB]:
    """Presents a certificate from the trusted CA, but for another host name."""
    home = tmp_path_factory.mktemp("misnamed-ferretdb")
    with running_secure_ferretdb(home, pki, wrong_name=True) as server:
        yield server


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every logger (memsync, clickhouse_driver, pymongo), to grep for secrets."""
    caplog.set_level(logging.DEBUG)
    return caplog


def _assert_no_secret(secrets: list[str], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text


# ---------------------------------------------------------------- ClickHouse


def _rows(n: int) -> list[HistoryRow]:
    return [
        HistoryRow(
            event_id=f"tls-{i}",
            entity_id=f"doc-{i}",
            data_type="context",
            operation="INSERT",
            collection="contexts",
            event_ts_ms=1_704_067_200_000 + i,
            version=1,
            data=f'{{"_id": "doc-{i}"}}',
            metadata=None,
            source="realtime",
        )
        for i in range(n)
    ]


def _store_failure(clickhouse: SecureClickHouse, **overrides: str) -> tuple[SinkUnavailable, float]:
    """The SinkUnavailable that ensure_schema() raises with these settings, and how long it took."""
    settings = Settings.from_env(clickhouse.env(**overrides))
    started = time.monotonic()
    with (
        HistoryStore.open(settings.clickhouse, "never_created", connect_timeout_s=5) as store,
        pytest.raises(SinkUnavailable) as caught,
    ):
        store.ensure_schema()
    return caught.value, time.monotonic() - started


def test_clickhouse_tls_with_password_and_ca_verification(clickhouse, all_logs):
    settings = Settings.from_env(clickhouse.env())
    target = settings.clickhouse
    assert (target.secure, target.port, target.user) == (True, clickhouse.tls_port, "memsync")
    assert target.ca_file == str(clickhouse.pki.ca_cert)
    assert target.password.value == clickhouse.password  # from the file, trailing newline stripped
    check_tls_files(settings)  # the start-up check loads the CA file

    table = "tls_" + uuid.uuid4().hex[:10]
    rows = _rows(5)
    with HistoryStore.open(target, table) as store:
        store.ensure_schema()
        store.insert(rows, dedup_token="tls-batch-1")
        assert store.server_version().startswith("18.16.")
        found = store.query(f"SELECT event_id, entity_id FROM {store.table_sql} ORDER BY event_id")
        assert found == [(r.event_id, r.entity_id) for r in rows]
        assert store.existing_event_ids([("doc-3", "tls-3"), ("doc-9", "tls-9")]) == {"tls-3"}
        store.ping()
    _assert_no_secret([clickhouse.password], all_logs.text, repr(settings), str(settings.describe()))


@pytest.mark.parametrize("ca", ["untrusted", "system trust store"])
def test_clickhouse_untrusted_ca_fails_certificate_verification(clickhouse, all_logs, ca):
    ca_file = str(clickhouse.pki.untrusted_ca_cert) if ca == "untrusted" else ""
    error, elapsed = _store_failure(clickhouse, CLICKHOUSE_CA_FILE=ca_file)
    # e.g. "NetworkError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local
    # issuer certificate (_ssl.c:1006) (127.0.0.1:PORT) (ClickHouse code 210)"; the _ssl.c line varies.
    message = str(error)
    assert message.startswith(f"NetworkError: {CERTIFICATE_VERIFY_FAILED} "), message
    assert message.endswith(f"(127.0.0.1:{clickhouse.tls_port}) (ClickHouse code 210)"), message
    assert error.code == 210  # NETWORK_ERROR: sink-level, the batch is held and retried, never DLQ'd
    assert elapsed < 3
    _assert_no_secret([clickhouse.password], str(error), repr(error), all_logs.text)


def test_clickhouse_certificate_for_another_host_fails_the_host_name_check(misnamed_clickhouse, all_logs):
    # The right CA signed it, so only the host-name check can refuse it.
    error, elapsed = _store_failure(misnamed_clickhouse)
    assert str(error).startswith(
        "NetworkError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, "
        "certificate is not valid for '127.0.0.1'."
    ), str(error)
    assert error.code == 210
    assert elapsed < 3
    _assert_no_secret([misnamed_clickhouse.password], str(error), all_logs.text)


def test_clickhouse_wrong_password_fails_with_wrong_password(clickhouse, all_logs):
    error, elapsed = _store_failure(
        clickhouse, CLICKHOUSE_PASSWORD_FILE="", CLICKHOUSE_PASSWORD=WRONG_PASSWORD
    )
    assert str(error) == (
        "ServerException: DB::Exception: Wrong password for user memsync. (ClickHouse code 193)"
    )
    assert error.code == 193
    assert elapsed < 3
    _assert_no_secret([WRONG_PASSWORD, clickhouse.password], str(error), repr(error), all_logs.text)


def test_clickhouse_without_password_is_refused(clickhouse, all_logs):
    error, _ = _store_failure(clickhouse, CLICKHOUSE_PASSWORD_FILE="")
    assert str(error) == (
        "ServerException: DB::Exception: Password required for user memsync. (ClickHouse code 194)"
    )


def test_clickhouse_tls_port_refuses_a_plaintext_client(clickhouse, all_logs):
    # A clickhouse:// URL (no TLS) aimed at the TLS port: the server resets the connection.
    error, elapsed = _store_failure(
        clickhouse,
        CLICKHOUSE_URL=f"clickhouse://memsync@127.0.0.1:{clickhouse.tls_port}/default",
        CLICKHOUSE_CA_FILE="",
    )
    assert error.code in (32, 210), str(error)  # EOF or NETWORK_ERROR, depending on timing
    assert elapsed < 3
    _assert_no_secret([clickhouse.password], str(error), all_logs.text)


def test_clickhouse_tls_client_on_the_plaintext_port_fails_fast(clickhouse, all_logs):
    # 18.16 cannot require TLS of a user; leaving tcp_port out is how a server goes TLS-only. This is
    # the other misconfiguration: clickhouses:// aimed at the plaintext port.
    error, elapsed = _store_failure(
        clickhouse, CLICKHOUSE_URL=f"clickhouses://memsync@127.0.0.1:{clickhouse.plain_port}/default"
    )
    assert error.code == 210, str(error)
    assert "[SSL: WRONG_VERSION_NUMBER] wrong version number" in str(error)
    assert elapsed < 3
    _assert_no_secret([clickhouse.password], str(error), all_logs.text)


# ---------------------------------------------------------------- MongoDB (FerretDB)


def _mongo_settings(uri: str, tmp_path: Path) -> Settings:
    uri_file = tmp_path / "mongodb-uri"
    uri_file.write_text(uri + "\n")
    uri_file.chmod(0o600)
    return Settings.from_env({"MONGODB_URI_FILE": str(uri_file), "WORKER_ID": "tls-test"})


def _mongo_round_trip(settings: Settings) -> tuple[dict, dict | None, int]:
    async def run() -> tuple[dict, dict | None, int]:
        client = async_client(settings)
        try:
            pong = await client.admin.command("ping")
            collection = client[settings.mongodb_database]["tls_" + uuid.uuid4().hex[:8]]
            inserted = await collection.insert_one({"kind": "tls-probe", "n": 1})
            found = await collection.find_one({"_id": inserted.inserted_id})
            count = await collection.count_documents({"kind": "tls-probe"})
            return pong, found, count
        finally:
            await client.close()

    return asyncio.run(run())


def _mongo_failure(settings: Settings) -> tuple[Exception, float]:
    started = time.monotonic()
    with pytest.raises((OperationFailure, ServerSelectionTimeoutError)) as caught:
        _mongo_round_trip(settings)
    return caught.value, time.monotonic() - started


def test_mongodb_tls_with_credentials_and_ca_from_the_uri(ferretdb, tmp_path, all_logs):
    settings = _mongo_settings(ferretdb.uri(), tmp_path)
    assert settings.describe()["mongodb"] == f"mongodb://memsync:***@127.0.0.1:{ferretdb.port}/"
    pong, found, count = _mongo_round_trip(settings)
    assert pong["ok"] == 1.0
    assert found is not None
    assert found["kind"] == "tls-probe"
    assert count == 1
    _assert_no_secret([ferretdb.password], all_logs.text, repr(settings), str(settings.describe()))


def test_mongodb_untrusted_ca_fails_certificate_verification(ferretdb, tmp_path, all_logs):
    # serverSelectionTimeoutMS in the URI is honoured (memsync's default is 10 s): URI options pass through.
    uri = ferretdb.uri(ca_file=ferretdb.pki.untrusted_ca_cert, serverSelectionTimeoutMS="1500")
    error, elapsed = _mongo_failure(_mongo_settings(uri, tmp_path))
    assert isinstance(error, ServerSelectionTimeoutError)
    assert f"127.0.0.1:{ferretdb.port}: {CERTIFICATE_VERIFY_FAILED}" in str(error)
    assert elapsed < 5
    _assert_no_secret([ferretdb.password], str(error), all_logs.text)


def test_mongodb_system_trust_store_does_not_know_the_test_ca(ferretdb, tmp_path):
    uri = ferretdb.uri(system_trust_store=True, serverSelectionTimeoutMS="1500")
    assert "tls=true" in uri
    assert "tlsCAFile" not in uri
    error, elapsed = _mongo_failure(_mongo_settings(uri, tmp_path))
    assert isinstance(error, ServerSelectionTimeoutError)
    assert CERTIFICATE_VERIFY_FAILED in str(error)
    assert elapsed < 5


def test_mongodb_certificate_for_another_host_fails_the_host_name_check(misnamed_ferretdb, tmp_path):
    error, elapsed = _mongo_failure(
        _mongo_settings(misnamed_ferretdb.uri(serverSelectionTimeoutMS="1500"), tmp_path)
    )
    assert isinstance(error, ServerSelectionTimeoutError)
    assert (
        f"127.0.0.1:{misnamed_ferretdb.port}: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
        "IP address mismatch, certificate is not valid for '127.0.0.1'."
    ) in str(error)
    assert elapsed < 5


def test_mongodb_wrong_password_fails_with_authentication_failed(ferretdb, tmp_path, all_logs):
    uri = ferretdb.uri(password=WRONG_PASSWORD, serverSelectionTimeoutMS="3000")
    error, elapsed = _mongo_failure(_mongo_settings(uri, tmp_path))
    assert isinstance(error, OperationFailure)
    assert error.code == 18  # AuthenticationFailed
    assert str(error).startswith("Authentication failed.")
    assert elapsed < 5
    _assert_no_secret([WRONG_PASSWORD, ferretdb.password], str(error), repr(error.details), all_logs.text)


def test_mongodb_without_credentials_is_unauthorized(ferretdb, tmp_path):
    # The server really checks: over the same TLS, no credentials means no writes.
    uri = ferretdb.uri(username=None, serverSelectionTimeoutMS="3000")
    error, _ = _mongo_failure(_mongo_settings(uri, tmp_path))
    assert isinstance(error, OperationFailure)
    assert error.code == 13  # Unauthorized
    assert "requires authentication" in str(error)


def test_mongodb_plaintext_client_is_refused_by_the_tls_listener(ferretdb, tmp_path, all_logs):
    uri = ferretdb.uri(tls=False, serverSelectionTimeoutMS="1500")
    error, elapsed = _mongo_failure(_mongo_settings(uri, tmp_path))
    assert isinstance(error, ServerSelectionTimeoutError)
    # "connection closed" or "connection is already closed", depending on where the driver notices
    assert re.search(rf"127\.0\.0\.1:{ferretdb.port}: connection (is already )?closed", str(error))
    assert elapsed < 5
    _assert_no_secret([ferretdb.password], str(error), all_logs.text)


def test_mongodb_uri_options_win_over_memsync_defaults(pki):
    # pymongo lets keyword arguments override the URI; memsync passes its defaults only for options the
    # URI leaves out, so an operator's timeouts and appName reach the driver (no server needed).
    given = Settings.from_env({
        "MONGODB_URI": f"mongodb://u:p@127.0.0.1:1/?tls=true&tlsCAFile={pki.ca_cert}"
                       "&serverSelectionTimeoutMS=1234&connecttimeoutms=77&appName=ops",
        "WORKER_ID": "w1",
    })
    defaults = Settings.from_env({"MONGODB_URI": "mongodb://127.0.0.1:1/", "WORKER_ID": "w1"})

    async def options(settings: Settings) -> tuple[float, float | None, str]:
        client = async_client(settings)
        try:
            opts = client.options
            return (
                opts.server_selection_timeout,
                opts.pool_options.connect_timeout,
                opts.pool_options.metadata["application"]["name"],
            )
        finally:
            await client.close()

    assert asyncio.run(options(given)) == (1.234, 0.077, "ops")
    assert asyncio.run(options(defaults)) == (10.0, 5.0, "memsync-w1")
