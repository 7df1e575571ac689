"""Configuration hardening: every variable is documented, every invalid value stops the worker at start
with a message naming the variable."""

from __future__ import annotations

import ast
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from app.kafka_clients import kafka_ssl_context
from app.settings import ENV_NAMES, ENV_VARIABLES, Settings, SettingsError, check_tls_files
from tests.conftest import ROOT
from tests.kafka_secure_broker import make_pki

SETTINGS_SOURCE = ROOT / "app" / "settings.py"


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers every name looked up, present or not."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.read.add(key)
        return self.values.get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("settings must look variables up by name, not scan the environment")

    def __len__(self) -> int:
        return len(self.values)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp_path = tmp_path_factory.mktemp("settings-files")
    pki = make_pki(tmp_path / "pki")
    paths = {"ca": str(pki.ca_cert), "cert": str(pki.client_cert), "key": str(pki.client_key)}
    encrypted_key = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", paths["key"], "-out", str(encrypted_key), "-aes256",
         "-passout", "pass:right"],
        check=True, capture_output=True,
    )
    paths["encrypted-key"] = str(encrypted_key)
    paths["other-key"] = str(pki.broker_keystore)  # a valid key, but not the client certificate's
    for name in ("secret", "policies", "garbage"):
        path = tmp_path / name
        path.write_text("{}\n" if name == "policies" else "value\n")
        paths[name] = str(path)
    (tmp_path / "mongodb-uri").write_text("mongodb://memsync:value@mongo:27017/?authSource=admin\n")
    paths["mongodb-uri"] = str(tmp_path / "mongodb-uri")
    (tmp_path / "empty").write_text("\n")
    paths["empty"] = str(tmp_path / "empty")
    paths["missing"] = str(tmp_path / "does-not-exist")
    paths["dir"] = str(tmp_path)
    return paths


def _shapes(files: dict[str, str]) -> list[dict[str, str]]:
    """Environments that between them take every branch of the parser."""
    return [
        {},
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD_FILE": files["secret"],
            "KAFKA_SSL_CA_FILE": files["ca"], "KAFKA_SSL_CERT_FILE": files["cert"],
            "KAFKA_SSL_KEY_FILE": files["key"], "KAFKA_SSL_KEY_PASSWORD_FILE": files["secret"],
            "CLICKHOUSE_URL": "clickhouses://memsync@ch:9440/db", "CLICKHOUSE_CA_FILE": files["ca"],
            "CLICKHOUSE_PASSWORD_FILE": files["secret"], "MONGODB_URI_FILE": files["mongodb-uri"],
            "RETENTION_POLICIES_FILE": files["policies"],
        },
        {"CLICKHOUSE_URL": "chdb:///tmp/ch", "RETENTION_POLICIES": "[]", "MONGODB_URI": "mongodb://h/"},
    ]


# ---------------------------------------------------------------- documentation


def test_every_variable_read_is_documented(files):
    read: set[str] = set()
    for shape in _shapes(files):
        env = RecordingEnv(shape)
        Settings.from_env(env)
        read |= env.read
    assert read - ENV_NAMES == set(), "read by app.settings but missing from ENV_VARIABLES"
    assert ENV_NAMES - read == set(), "documented in ENV_VARIABLES but never read"


def test_every_variable_named_in_the_source_is_documented():
    """A static check too, for branches no shape above reaches."""
    tree = ast.parse(SETTINGS_SOURCE.read_text())
    parse_functions = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("__")
        and node.name != "_secret_var"
    ]
    named = {
        node.value
        for function in parse_functions
        for node in ast.walk(function)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", node.value)
    }
    named -= {"SASL_SSL", "SASL_PLAINTEXT", "KAFKA_SSL"}  # protocol values and a prefix, not variables
    assert named - ENV_NAMES == set()


def test_registry_is_well_formed():
    names = [var.name for var in ENV_VARIABLES]
    assert len(names) == len(set(names)), "a variable is listed twice"
    for var in ENV_VARIABLES:
        assert var.meaning.strip().endswith((".", ")")), var.name
        assert var.default.strip(), f"{var.name}: write (unset) or (empty) instead of nothing"
        if var.has_file:
            assert f"`{var.name}_FILE`" in var.meaning


def test_documented_defaults_are_the_real_defaults():
    baseline = Settings.from_env({})
    for var in ENV_VARIABLES:
        if var.default.startswith("("):
            continue  # described, not literal
        assert Settings.from_env({var.name: var.default}) == baseline, var.name


def test_readme_configuration_table_lists_every_variable():
    readme = (ROOT / "README.md").read_text()
    assert "\n## Configuration\n" in readme
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {
        match.group(1)
        for match in re.finditer(r"^\|\s*`([A-Z][A-Z0-9_]+)`", section, flags=re.MULTILINE)
    }
    documented = {var.name for var in ENV_VARIABLES}
    assert documented - rows == set(), "missing from README.md's configuration table"
    assert rows - documented == set(), "in README.md's table but not read by app.settings"
    for var in ENV_VARIABLES:
        if var.has_file:
            assert f"`{var.name}_FILE`" in section, var.name


# ---------------------------------------------------------------- valid values


def test_defaults_parse():
    settings = Settings.from_env({})
    assert settings.batch_size == 1000
    assert settings.kafka_security.protocol == "PLAINTEXT"
    assert settings.dlq_topic == "memory.sync.events.dlq"


def test_production_shape_parses(files):
    settings = Settings.from_env(_shapes(files)[1])
    security = settings.kafka_security
    assert (security.protocol, security.sasl_mechanism, security.sasl_username) == (
        "SASL_SSL", "SCRAM-SHA-512", "u"
    )
    assert security.sasl_password.value == "value"
    assert settings.clickhouse.secure
    assert settings.clickhouse.port == 9440
    assert settings.clickhouse.password.value == "value"


@pytest.mark.parametrize(
    "servers", ["kafka:9092", "a:1,b:2", "10.0.0.1:9093", "[::1]:9092", "kafka-0.kafka.ns.svc:9093"]
)
def test_bootstrap_servers_accepted(servers):
    assert Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": servers}).kafka_bootstrap_servers == tuple(
        servers.split(",")
    )


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://localhost/",
        "mongodb://u:p%40ss@h1:27017,h2:27018/memory?replicaSet=rs0&authSource=admin",
        "mongodb+srv://u:p@cluster0.example.net/?retryWrites=true",
        "mongodb://h/?tls=true&tlsAllowInvalidHostnames=false",
    ],
)
def test_mongodb_uris_accepted_without_network(uri):
    assert Settings.from_env({"MONGODB_URI": uri}).mongodb_uri.value == uri


def test_empty_value_means_default():
    assert Settings.from_env({"BATCH_SIZE": "  ", "MONGODB_URI": ""}) == Settings.from_env({})


# ---------------------------------------------------------------- invalid values, one class each

INVALID: list[tuple[str, dict[str, str], str]] = [
    # numbers
    ("negative batch size", {"BATCH_SIZE": "-1"}, "BATCH_SIZE must be between 1 and 100000, got -1"),
    ("zero batch size", {"BATCH_SIZE": "0"}, "BATCH_SIZE"),
    ("non-integer", {"SYNC_LOOKBACK_HOURS": "24h"}, "SYNC_LOOKBACK_HOURS must be an integer"),
    ("too many partitions", {"KAFKA_TOPIC_PARTITIONS": "5000"}, "KAFKA_TOPIC_PARTITIONS"),
    ("port out of range", {"WEB_PORT": "70000"}, "WEB_PORT"),
    ("not a number", {"SINK_BATCH_WITHIN_SECONDS": "soon"}, "SINK_BATCH_WITHIN_SECONDS must be a number"),
    ("nan", {"SINK_BACKOFF_MAX_SECONDS": "nan"}, "SINK_BACKOFF_MAX_SECONDS must be a finite number"),
    ("zero seconds", {"SINK_BATCH_WITHIN_SECONDS": "0"}, "SINK_BATCH_WITHIN_SECONDS"),
    ("tiny documents", {"MAX_DOCUMENT_BYTES": "10"}, "MAX_DOCUMENT_BYTES"),
    # booleans and choices
    ("bad boolean", {"ENABLE_REALTIME_SYNC": "maybe"}, "ENABLE_REALTIME_SYNC must be true or false"),
    ("unknown codec", {"EVENT_CODEC": "protobuf"}, "EVENT_CODEC must be one of avro, json"),
    ("unknown protocol", {"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL must be one of"),
    ("unknown mechanism", {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
                           "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
     "KAFKA_SASL_MECHANISM must be one of"),
    ("unknown log level", {"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
    # cron
    ("bad cron", {"RECONCILE_SCHEDULE": "0 25 * * *"}, "RECONCILE_SCHEDULE must be a 5-field cron"),
    ("cron macro", {"RETENTION_SCHEDULE": "@daily"}, "RETENTION_SCHEDULE must be a 5-field cron"),
    ("6-field cron", {"RECONCILE_SCHEDULE": "0 0 2 * * *"}, "RECONCILE_SCHEDULE"),
    # URLs and addresses
    ("bootstrap without port", {"KAFKA_BOOTSTRAP_SERVERS": "kafka"},
     "KAFKA_BOOTSTRAP_SERVERS must be host:port"),
    ("bootstrap with scheme", {"KAFKA_BOOTSTRAP_SERVERS": "kafka://kafka:9092"}, "KAFKA_BOOTSTRAP_SERVERS"),
    ("bootstrap bad port", {"KAFKA_BOOTSTRAP_SERVERS": "kafka:0"}, "KAFKA_BOOTSTRAP_SERVERS"),
    ("bootstrap empty item", {"KAFKA_BOOTSTRAP_SERVERS": ","}, "KAFKA_BOOTSTRAP_SERVERS"),
    ("bootstrap bad host", {"KAFKA_BOOTSTRAP_SERVERS": "ka fka:9092"}, "KAFKA_BOOTSTRAP_SERVERS"),
    ("clickhouse scheme", {"CLICKHOUSE_URL": "http://ch:8123/"}, "CLICKHOUSE_URL must start with"),
    ("clickhouse not a url", {"CLICKHOUSE_URL": "clickhouse"}, "CLICKHOUSE_URL"),
    ("clickhouse bad port", {"CLICKHOUSE_URL": "clickhouse://ch:port/db"}, "CLICKHOUSE_URL has an invalid"),
    ("clickhouse no host", {"CLICKHOUSE_URL": "clickhouse:///db"}, "CLICKHOUSE_URL must name a host"),
    ("clickhouse password in url", {"CLICKHOUSE_URL": "clickhouse://u:pw@ch/db"},
     "CLICKHOUSE_URL must not carry a password"),
    ("clickhouse options", {"CLICKHOUSE_URL": "clickhouse://ch/db?secure=1"},
     "CLICKHOUSE_URL must not carry ?options"),
    ("clickhouse bad database", {"CLICKHOUSE_URL": "clickhouse://ch/my-db"}, "CLICKHOUSE_URL: database name"),
    ("chdb without path", {"CLICKHOUSE_URL": "chdb://"}, "CLICKHOUSE_URL: chdb:// needs"),
    ("chdb with password", {"CLICKHOUSE_URL": "chdb:///x", "CLICKHOUSE_PASSWORD": "p"},
     "CLICKHOUSE_PASSWORD is set but CLICKHOUSE_URL is chdb://"),
    ("mongo scheme", {"MONGODB_URI": "postgres://h/"}, "MONGODB_URI must start with mongodb://"),
    ("mongo no host", {"MONGODB_URI": "mongodb:///db"}, "MONGODB_URI must name at least one host"),
    ("mongo bad port", {"MONGODB_URI": "mongodb://h:99999/"}, "MONGODB_URI is not a valid MongoDB"),
    ("mongo unescaped @", {"MONGODB_URI": "mongodb://u:p@ss@h/"}, "MONGODB_URI is not a valid MongoDB"),
    ("mongo unknown option", {"MONGODB_URI": "mongodb://h/?colour=blue"}, "MONGODB_URI is not a valid"),
    ("mongo bad option", {"MONGODB_URI": "mongodb://h/?tls=maybe"}, "MONGODB_URI is not a valid"),
    ("mongo srv port", {"MONGODB_URI": "mongodb+srv://h.example.com:27017/"}, "MONGODB_URI: mongodb+srv://"),
    ("web bind", {"WEB_BIND": "not an address"}, "WEB_BIND"),
    # names
    ("bad topic", {"KAFKA_SYNC_TOPIC": "memory sync"}, "KAFKA_SYNC_TOPIC is not a valid Kafka topic"),
    ("bad group", {"KAFKA_CONSUMER_GROUP": "g/1"}, "KAFKA_CONSUMER_GROUP"),
    ("bad database", {"MONGODB_DATABASE": "a.b"}, "MONGODB_DATABASE"),
    ("bad table", {"CLICKHOUSE_HISTORY_TABLE": "drop table"}, "CLICKHOUSE_HISTORY_TABLE"),
    ("no collections", {"SYNC_COLLECTIONS": " , "}, "SYNC_COLLECTIONS must list"),
    # security combinations
    ("SASL without credentials", {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
     "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"),
    ("SASL without password", {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"},
     "needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"),
    ("credentials without SASL", {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
     "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL"),
    ("cert without key", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "{cert}"},
     "KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE must be set together"),
    ("CA without TLS", {"KAFKA_SSL_CA_FILE": "{ca}"},
     "KAFKA_SSL_CA_FILE set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"),
    ("clickhouse CA without TLS", {"CLICKHOUSE_CA_FILE": "{ca}"}, "CLICKHOUSE_CA_FILE is set but"),
    ("key password without key", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEY_PASSWORD": "p"},
     "KAFKA_SSL_KEY_PASSWORD is set but KAFKA_SSL_KEY_FILE is not"),
    # files
    ("missing CA file", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": "{missing}"},
     "KAFKA_SSL_CA_FILE names a file that does not exist"),
    ("missing password file", {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u",
                               "KAFKA_SASL_PASSWORD_FILE": "{missing}"},
     "KAFKA_SASL_PASSWORD_FILE: cannot read"),
    ("empty password file", {"CLICKHOUSE_PASSWORD_FILE": "{empty}"}, "CLICKHOUSE_PASSWORD_FILE: "),
    ("password file is a directory", {"MONGODB_URI_FILE": "{dir}"}, "MONGODB_URI_FILE: cannot read"),
    ("secret and its file", {"CLICKHOUSE_PASSWORD": "p", "CLICKHOUSE_PASSWORD_FILE": "{secret}"},
     "set CLICKHOUSE_PASSWORD or CLICKHOUSE_PASSWORD_FILE, not both"),
    ("missing policies file", {"RETENTION_POLICIES_FILE": "{missing}"}, "RETENTION_POLICIES_FILE"),
    ("policies twice", {"RETENTION_POLICIES_FILE": "{policies}", "RETENTION_POLICIES": "{{}}"},
     "set RETENTION_POLICIES or RETENTION_POLICIES_FILE, not both"),
    ("policies not JSON", {"RETENTION_POLICIES": "{{"}, "RETENTION_POLICIES is not valid JSON"),
    ("missing schema", {"EVENT_SCHEMA_PATH": "{missing}"}, "EVENT_SCHEMA_PATH names a file"),
    ("data dir is a file", {"MEMSYNC_DATA_DIR": "{secret}"}, "MEMSYNC_DATA_DIR must be a directory"),
]


@pytest.mark.parametrize(("env", "message"), [(env, message) for _, env, message in INVALID],
                         ids=[case for case, _, _ in INVALID])
def test_invalid_value_is_refused_naming_the_variable(files, env, message):
    resolved = {key: value.format(**files) for key, value in env.items()}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(resolved)
    assert message.format(**files) in str(caught.value)
    named = {name for name in ENV_NAMES if re.search(rf"\b{name}\b", str(caught.value))}
    assert named & set(resolved), f"the message names none of {sorted(resolved)}: {caught.value}"


def test_every_variable_has_an_invalid_value_test_or_accepts_anything():
    """Each variable with a constrained value appears in at least one INVALID case."""
    free_form = {"KAFKA_SASL_USERNAME", "WORKER_ID", "KAFKA_SSL_CHECK_HOSTNAME"}
    covered = {name for _, env, _ in INVALID + TLS_FILES_INVALID for name in env}
    missing = {var.name for var in ENV_VARIABLES} - covered - free_form
    missing = {name for name in missing if f"{name}_FILE" not in covered}
    # These are validated like a covered sibling (same helper), listed so a new variable is a decision.
    siblings = {
        "KAFKA_DLQ_TOPIC", "KAFKA_RETRY_TOPIC", "KAFKA_CONTROL_TOPIC", "KAFKA_REPLICATION_FACTOR",
        "KAFKA_DLQ_RETENTION_MS", "SINK_BATCH_MAX_EVENTS", "KAFKA_MAX_PARTITION_FETCH_BYTES",
        "IDEMPOTENCY_HORIZON_HOURS", "WEB_TABLE_ROUTES_ENABLED", "CLICKHOUSE_PASSWORD",
    }
    assert missing - siblings == set()


TLS_FILES_INVALID: list[tuple[str, dict[str, str], str]] = [
    ("CA not PEM", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": "{garbage}"},
     "KAFKA_SSL_CA_FILE: '{garbage}' holds no usable PEM CA certificate"),
    ("ClickHouse CA not PEM", {"CLICKHOUSE_URL": "clickhouses://ch/db", "CLICKHOUSE_CA_FILE": "{garbage}"},
     "CLICKHOUSE_CA_FILE: '{garbage}' holds no usable PEM CA certificate"),
    ("client key not PEM", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "{cert}",
                            "KAFKA_SSL_KEY_FILE": "{garbage}"},
     "KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: cannot load the client certificate and key"),
    ("key of another certificate", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "{cert}",
                                    "KAFKA_SSL_KEY_FILE": "{other-key}"},
     "KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: cannot load"),
    ("encrypted key without password", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "{cert}",
                                        "KAFKA_SSL_KEY_FILE": "{encrypted-key}"},
     "is KAFKA_SSL_KEY_PASSWORD right?"),
    ("encrypted key, wrong password", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "{cert}",
                                       "KAFKA_SSL_KEY_FILE": "{encrypted-key}",
                                       "KAFKA_SSL_KEY_PASSWORD": "wrong"},
     "is KAFKA_SSL_KEY_PASSWORD right?"),
]


@pytest.mark.parametrize(("env", "message"), [(env, message) for _, env, message in TLS_FILES_INVALID],
                         ids=[case for case, _, _ in TLS_FILES_INVALID])
def test_unusable_tls_files_are_refused_naming_the_variable(files, env, message):
    """`from_env` checks the files exist; `check_tls_files` and the Kafka TLS context load them."""
    settings = Settings.from_env({key: value.format(**files) for key, value in env.items()})
    with pytest.raises(SettingsError) as caught:
        check_tls_files(settings)
    assert message.format(**files) in str(caught.value)
    if settings.kafka_security.uses_tls:
        with pytest.raises(SettingsError) as from_context:
            kafka_ssl_context(settings.kafka_security)
        assert str(from_context.value) == str(caught.value)


def test_encrypted_client_key_loads_with_its_password(files):
    settings = Settings.from_env({
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CA_FILE": files["ca"],
        "KAFKA_SSL_CERT_FILE": files["cert"],
        "KAFKA_SSL_KEY_FILE": files["encrypted-key"],
        "KAFKA_SSL_KEY_PASSWORD": "right",
    })
    check_tls_files(settings)
    context = kafka_ssl_context(settings.kafka_security)
    assert context.verify_mode == ssl.CERT_REQUIRED


# ---------------------------------------------------------------- end to end


def test_worker_with_invalid_configuration_exits_at_once_naming_the_variable(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ENV_NAMES}
    env |= {"BATCH_SIZE": "-1", "MEMSYNC_DATA_DIR": str(tmp_path)}
    faust = str(Path(sys.executable).with_name("faust"))
    started = time.monotonic()
    result = subprocess.run(
        [faust, "-A", "app", "worker", "-l", "info"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert elapsed < 20
    assert (
        "memsync: invalid configuration: BATCH_SIZE must be between 1 and 100000, got -1"
        in result.stderr.splitlines()
    )
    assert "Traceback" not in result.stderr
