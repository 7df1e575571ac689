"""Secrets never leave `Secret`: not through repr/str, descriptions, error messages or debug logs;
and the Kafka credentials never downgrade SASL_SSL to SASL_PLAINTEXT (the password in clear)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import ssl
import subprocess
from pathlib import Path

import pytest
from aiokafka.protocol.admin import SaslAuthenticateRequest_v1, SaslHandShakeRequest_v1
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from app.factory import create_app, kafka_credentials
from app.kafka_clients import kafka_security_kwargs, kafka_ssl_context, redact_sasl_logging
from app.settings import Secret, Settings, SettingsError, check_tls_files, redact_mongodb_uri
from tests.kafka_secure_broker import make_pki

KAFKA_PASSWORD = "kafka-Pw-4f1b9c"
KEY_PASSWORD = "key-Pw-8d2e7a"
CLICKHOUSE_PASSWORD = "ch-Pw-3c6a0f"
MONGO_PASSWORD = "mongo-Pw-9e4d21"
MONGO_OPTION_SECRET = "tlsKey-Pw-77ab10"
SECRETS = (KAFKA_PASSWORD, KEY_PASSWORD, CLICKHOUSE_PASSWORD, MONGO_PASSWORD, MONGO_OPTION_SECRET)


def _assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} leaked into: {text[:500]}"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    pki = make_pki(tmp_path / "pki")
    return Settings.from_env({
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "memsync",
        "KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
        "KAFKA_SSL_CA_FILE": str(pki.ca_cert),
        "KAFKA_SSL_CERT_FILE": str(pki.client_cert),
        "KAFKA_SSL_KEY_FILE": str(pki.client_key),
        "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
        "CLICKHOUSE_URL": "clickhouses://memsync@clickhouse:9440/default",
        "CLICKHOUSE_PASSWORD": CLICKHOUSE_PASSWORD,
        "MONGODB_URI": (
            f"mongodb://memsync:{MONGO_PASSWORD}@mongo-0:27017,mongo-1:27017/memory"
            f"?authSource=admin&tls=true&tlsCertificateKeyFilePassword={MONGO_OPTION_SECRET}"
        ),
        "MEMSYNC_DATA_DIR": str(tmp_path / "data"),
    })


def test_settings_hold_the_values(settings):
    """The other tests would pass trivially if the secrets were dropped: they are there."""
    assert settings.kafka_security.sasl_password.value == KAFKA_PASSWORD
    assert settings.kafka_security.key_password.value == KEY_PASSWORD
    assert settings.clickhouse.password.value == CLICKHOUSE_PASSWORD
    assert MONGO_PASSWORD in settings.mongodb_uri.value


def test_repr_str_and_format_are_masked(settings):
    secret = settings.kafka_security.sasl_password
    for text in (repr(settings), str(settings), f"{settings}", f"{secret:>20}", f"{settings!r:>10}"):
        _assert_clean(text)
    secret = settings.clickhouse.password
    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert repr(Secret("")) == "Secret('')"


def test_asdict_keeps_secrets_masked(settings):
    _assert_clean(repr(dataclasses.asdict(settings)))
    _assert_clean(str(dataclasses.astuple(settings)))


def test_describe_is_secret_free_and_still_useful(settings):
    description = settings.describe()
    _assert_clean(json.dumps(description, default=str))
    assert description["mongodb"] == "mongodb://memsync:***@mongo-0:27017,mongo-1:27017/memory"
    assert description["clickhouse"] == "clickhouses://memsync@clickhouse:9440/default"
    assert description["kafka_security_protocol"] == "SASL_SSL"


def test_secrets_compare_and_pickle_by_value():
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert len({Secret("a"), Secret("a")}) == 1
    assert pickle.loads(pickle.dumps(Secret("a"))).value == "a"


def test_faust_credentials_and_app_configuration_are_masked(settings):
    _assert_clean(repr(kafka_credentials(settings.kafka_security)))
    sasl_only = dataclasses.replace(
        settings,
        kafka_security=dataclasses.replace(
            settings.kafka_security, cert_file=None, key_file=None, key_password=Secret(""), ca_file=None
        ),
    )
    faust_app = create_app(sasl_only)
    _assert_clean(repr(faust_app.conf.broker_credentials))
    _assert_clean(repr(faust_app.conf))


@pytest.mark.parametrize(
    "env",
    [
        {"MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}@mongo:99999/"},
        {"MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}@mongo:port/"},
        {"MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}@bad@mongo/"},
        {"MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}/@mongo/"},
        {"MONGODB_URI": f"mongodb://memsync:{MONGO_PASSWORD}@mongo/?colour=blue"},
        {"MONGODB_URI": f"mongodb://mongo/?tlsCertificateKeyFilePassword={MONGO_OPTION_SECRET}&tls=maybe"},
        {"MONGODB_URI": f"mongodb://mongo/?authMechanismProperties={MONGO_OPTION_SECRET}"},
        {"MONGODB_URI": f"postgres://memsync:{MONGO_PASSWORD}@mongo/"},
        {"MONGODB_URI": f"mongodb+srv://memsync:{MONGO_PASSWORD}@a.example.com,b.example.com/"},
        {"CLICKHOUSE_URL": f"clickhouse://memsync:{CLICKHOUSE_PASSWORD}@clickhouse/default"},
        {"CLICKHOUSE_URL": f"clickhouse://memsync:{CLICKHOUSE_PASSWORD}@clickhouse:x/default"},
        {"CLICKHOUSE_URL": "chdb:///tmp/x", "CLICKHOUSE_PASSWORD": CLICKHOUSE_PASSWORD},
        {"CLICKHOUSE_PASSWORD": CLICKHOUSE_PASSWORD, "CLICKHOUSE_PASSWORD_FILE": "/nonexistent"},
        {"KAFKA_SASL_USERNAME": "memsync", "KAFKA_SASL_PASSWORD": KAFKA_PASSWORD},
        {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_PASSWORD": KAFKA_PASSWORD},
        {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD},
    ],
    ids=lambda env: ",".join(env),
)
def test_error_messages_never_quote_a_secret(env):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    _assert_clean(str(caught.value))
    _assert_clean(repr(caught.value))
    assert caught.value.__cause__ is None  # `from None`: no chained driver error carrying the URI


def test_secret_file_errors_name_the_file_not_the_content(tmp_path):
    uri_file = tmp_path / "mongodb-uri"
    uri_file.write_text(f"mongodb://memsync:{MONGO_PASSWORD}@mongo:99999/\n")
    with pytest.raises(SettingsError, match="MONGODB_URI") as caught:
        Settings.from_env({"MONGODB_URI_FILE": str(uri_file)})
    _assert_clean(str(caught.value))


def test_redacted_mongodb_uri_never_echoes_what_it_cannot_parse():
    assert redact_mongodb_uri(f"mongodb://u:{MONGO_PASSWORD}@h:1/db?tls=true") == "mongodb://u:***@h:1/db"
    assert redact_mongodb_uri(f"mongodb://u:{MONGO_PASSWORD}@bad@h/") == "(invalid MongoDB URI)"
    assert redact_mongodb_uri(f"mongodb+srv://u:{MONGO_PASSWORD}@c.example.net/") == (
        "mongodb+srv://u:***@c.example.net/"
    )


def test_aiokafka_debug_log_of_sasl_exchange_is_masked(caplog):
    """aiokafka logs request structs at DEBUG; with PLAIN the SASL bytes are the password in clear."""
    redact_sasl_logging()
    redact_sasl_logging()  # idempotent
    connection_logger = logging.getLogger("aiokafka.conn")
    request = SaslAuthenticateRequest_v1(f"\0memsync\0{KAFKA_PASSWORD}".encode())
    line = "Request to %s:%d %d: %s"
    with caplog.at_level(logging.DEBUG, logger="aiokafka.conn"):
        connection_logger.debug(line, "127.0.0.1", 9093, 3, request)
        connection_logger.debug(line, "127.0.0.1", 9093, 2, SaslHandShakeRequest_v1("PLAIN"))
        connection_logger.debug(line, "127.0.0.1", 9093, 4, "MetadataRequest_v1(...)")
    _assert_clean(caplog.text)
    assert "SaslAuthenticateRequest_v1(***)" in caplog.text
    assert "MetadataRequest_v1(...)" in caplog.text
    assert sum(f.__class__.__name__ == "_RedactSaslExchange" for f in connection_logger.filters) == 1


def test_tls_file_errors_never_quote_the_key_password(tmp_path):
    pki = make_pki(tmp_path / "pki")
    encrypted = tmp_path / "client-encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.client_key), "-out", str(encrypted), "-aes256",
         "-passout", "pass:the-right-one"],
        check=True, capture_output=True,
    )
    settings = Settings.from_env({
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CERT_FILE": str(pki.client_cert),
        "KAFKA_SSL_KEY_FILE": str(encrypted),
        "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
    })
    for check in (lambda: check_tls_files(settings), lambda: kafka_ssl_context(settings.kafka_security)):
        with pytest.raises(SettingsError, match="KAFKA_SSL_KEY_PASSWORD right") as caught:
            check()
        _assert_clean(str(caught.value))


# ---------------------------------------------------------------- Kafka protocol: no silent downgrade
# Here, not in tests/integration/test_kafka_security.py, because it needs no broker: a unit run catches
# credentials that would send a SASL password over plaintext.


@pytest.mark.parametrize(
    ("protocol", "mechanism"),
    [("SSL", ""), ("SASL_SSL", "SCRAM-SHA-512"), ("SASL_SSL", "PLAIN"), ("SASL_PLAINTEXT", "SCRAM-SHA-256")],
)
def test_faust_credentials_keep_the_configured_protocol(tmp_path, protocol, mechanism):
    """Faust's SASLCredentials means SASL_PLAINTEXT unless given an SSL context: ours never downgrade."""
    ca = make_pki(tmp_path).ca_cert
    env = {"KAFKA_SECURITY_PROTOCOL": protocol}
    if protocol.startswith("SASL"):
        env |= {"KAFKA_SASL_MECHANISM": mechanism, "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}
    if protocol.endswith("SSL"):
        env["KAFKA_SSL_CA_FILE"] = str(ca)
    security = Settings.from_env(env).kafka_security
    faust_auth = credentials_to_aiokafka_auth(kafka_credentials(security))
    plain_auth = kafka_security_kwargs(security)
    assert faust_auth["security_protocol"] == plain_auth["security_protocol"] == protocol
    if protocol.startswith("SASL"):
        assert faust_auth["sasl_mechanism"] == plain_auth["sasl_mechanism"] == mechanism
        assert faust_auth["sasl_plain_username"] == "u"
    if protocol.endswith("SSL"):
        for context in (faust_auth["ssl_context"], plain_auth["ssl_context"]):
            assert context.verify_mode == ssl.CERT_REQUIRED
            assert context.check_hostname
    else:
        assert faust_auth["ssl_context"] is None
        assert "ssl_context" not in plain_auth
