"""memsync configuration: the environment turned into one typed, validated object.

Every variable the service reads is declared here and nowhere else, and documented in `ENV_VARIABLES`
(the README's configuration table is checked against it). An invalid value raises `SettingsError`
naming the variable, so a worker with a bad configuration stops at start with a message an operator can
act on. Secrets may come from `NAME` or from a file named by `NAME_FILE` (Kubernetes Secret volumes);
they are held in `Secret`, whose repr never shows the value, and no error message quotes them.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from croniter import croniter
from pymongo.uri_parser import parse_userinfo, split_hosts, split_options

ROOT = Path(__file__).resolve().parent.parent

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CODECS = ("avro", "json")
CLICKHOUSE_SCHEMES = ("clickhouse", "clickhouses", "chdb")
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A configuration variable is missing or invalid; the message names it."""


class Secret:
    """A credential. Never printed: repr and str are masked.

    Deliberately not a dataclass: `dataclasses.asdict(settings)` copies a Secret as an object (still
    masked) instead of unpacking its value into a plain dict that someone might log.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))


# Shared defaults are safe: a Secret cannot be changed after construction.
NO_SECRET = Secret("")
_DEFAULT_MONGODB_URI = Secret("mongodb://mongodb:27017/")


@dataclass(frozen=True)
class ClickHouseTarget:
    """Where the history table lives: a ClickHouse server (native protocol) or an embedded chdb path."""

    backend: str  # "server" | "chdb"
    host: str = ""
    port: int = 9000
    database: str = "default"
    user: str = "default"
    password: Secret = NO_SECRET
    secure: bool = False
    ca_file: str | None = None
    path: str = ""  # chdb data directory

    def describe(self) -> str:
        """A secret-free description for logs and web views."""
        if self.backend == "chdb":
            return f"chdb:{self.path}"
        scheme = "clickhouses" if self.secure else "clickhouse"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: Secret = NO_SECRET
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret = NO_SECRET
    check_hostname: bool = True

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True)
class Settings:
    enable_realtime_sync: bool = True
    kafka_bootstrap_servers: tuple[str, ...] = ("kafka:9092",)
    sync_topic: str = "memory.sync.events"
    dlq_topic: str = "memory.sync.events.dlq"
    retry_topic: str = "memory.sync.events.retry"
    control_topic: str = "memsync.control"
    consumer_group: str = "memory-sync-consumer"
    topic_partitions: int = 8
    max_partition_fetch_bytes: int = 8 * 1024 * 1024
    topic_replication_factor: int = 1
    dlq_retention_ms: int = 7 * 24 * 3600 * 1000
    kafka_security: KafkaSecurity = KafkaSecurity()
    codec: str = "avro"
    mongodb_uri: Secret = _DEFAULT_MONGODB_URI
    mongodb_database: str = "memory"
    sync_collections: tuple[str, ...] = ("contexts", "episodes", "facts")
    clickhouse: ClickHouseTarget = ClickHouseTarget(backend="server", host="clickhouse")
    history_table: str = "operational_context_history"
    batch_size: int = 1000
    sync_lookback_hours: int = 24
    sink_batch_max_events: int = 20000
    sink_batch_within_s: float = 0.2
    sink_backoff_max_s: float = 30.0
    max_document_bytes: int = 1_000_000
    idempotency_horizon_hours: int = 168
    reconcile_schedule: str = "0 2 * * *"
    retention_schedule: str = "0 3 * * *"
    retention_policies_file: str | None = None
    retention_policies_json: str | None = None
    data_dir: Path = ROOT / "data"
    web_port: int = 6066
    web_bind: str = "0.0.0.0"
    web_table_routes_enabled: bool = False
    worker_id: str = field(default_factory=socket.gethostname)
    log_level: str = "info"
    schema_path: Path = ROOT / "schemas" / "memory-sync-event.avsc"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return _parse(os.environ if env is None else env)

    def describe(self) -> dict[str, object]:
        """Effective configuration for logs and web views, without secrets."""
        return {
            "enable_realtime_sync": self.enable_realtime_sync,
            "kafka_bootstrap_servers": list(self.kafka_bootstrap_servers),
            "kafka_security_protocol": self.kafka_security.protocol,
            "sync_topic": self.sync_topic,
            "dlq_topic": self.dlq_topic,
            "retry_topic": self.retry_topic,
            "consumer_group": self.consumer_group,
            "topic_partitions": self.topic_partitions,
            "max_partition_fetch_bytes": self.max_partition_fetch_bytes,
            "codec": self.codec,
            "mongodb": redact_mongodb_uri(self.mongodb_uri.value),
            "mongodb_database": self.mongodb_database,
            "sync_collections": list(self.sync_collections),
            "clickhouse": self.clickhouse.describe(),
            "history_table": self.history_table,
            "batch_size": self.batch_size,
            "sync_lookback_hours": self.sync_lookback_hours,
            "sink_batch_max_events": self.sink_batch_max_events,
            "idempotency_horizon_hours": self.idempotency_horizon_hours,
            "reconcile_schedule": self.reconcile_schedule,
            "retention_schedule": self.retention_schedule,
            "worker_id": self.worker_id,
        }


# ------------------------------------------------------------------ the documented variables


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: its name, its default as written in the environment, its meaning.

    A default in parentheses is a description ("(unset)", "(the host name)"), not a literal value.
    `has_file` marks secrets that may instead be read from the file named by `<name>_FILE`.
    """

    name: str
    default: str
    meaning: str
    has_file: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_FILE") if self.has_file else (self.name,)


def _secret_var(name: str, default: str, meaning: str) -> EnvVar:
    return EnvVar(
        name, default, f"{meaning} Secret: or the contents of the file named by `{name}_FILE`.", True
    )


ENV_VARIABLES: tuple[EnvVar, ...] = (
    # Kafka
    EnvVar("ENABLE_REALTIME_SYNC", "true",
           "Consume `KAFKA_SYNC_TOPIC` (the real-time path); `false` leaves batch reconciliation and "
           "retention only."),
    EnvVar("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092", "Kafka brokers, `host:port[,host:port...]`."),
    EnvVar("KAFKA_SYNC_TOPIC", "memory.sync.events", "Topic of `MemorySyncEvent` records."),
    EnvVar("KAFKA_DLQ_TOPIC", "(`KAFKA_SYNC_TOPIC`.dlq)",
           "Dead-letter topic: events that failed every retry, with the error."),
    EnvVar("KAFKA_RETRY_TOPIC", "(`KAFKA_SYNC_TOPIC`.retry)",
           "Topic of events waiting for their next retry."),
    EnvVar("KAFKA_CONTROL_TOPIC", "memsync.control",
           "Topic of control messages between workers (e.g. scheduled-job triggers)."),
    EnvVar("KAFKA_CONSUMER_GROUP", "memory-sync-consumer",
           "Consumer group and Faust application id (also the prefix of the table changelog topics)."),
    EnvVar("KAFKA_TOPIC_PARTITIONS", "8",
           "Partitions of the topics memsync creates (1-1024); the upper bound on worker parallelism."),
    EnvVar("KAFKA_REPLICATION_FACTOR", "1", "Replication factor of the topics memsync creates (1-16)."),
    EnvVar("KAFKA_MAX_PARTITION_FETCH_BYTES", "8388608",
           "Most bytes one fetch returns per partition (1 MiB-256 MiB). Kafka's 1 MiB default starves the "
           "sink: a worker reads a batch only as fast as fetches arrive."),
    EnvVar("KAFKA_DLQ_RETENTION_MS", "604800000", "Retention of the dead-letter topic, ms (7 days)."),
    EnvVar("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
           "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` (production)."),
    EnvVar("KAFKA_SASL_MECHANISM", "PLAIN",
           "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; only with a `SASL_*` protocol."),
    EnvVar("KAFKA_SASL_USERNAME", "(unset)", "SASL user; required with a `SASL_*` protocol."),
    _secret_var("KAFKA_SASL_PASSWORD", "(unset)", "SASL password; required with a `SASL_*` protocol."),
    EnvVar("KAFKA_SSL_CA_FILE", "(system trust store)",
           "PEM file of the CA(s) that signed the brokers' certificates; `SSL`/`SASL_SSL` only."),
    EnvVar("KAFKA_SSL_CERT_FILE", "(unset)",
           "PEM client certificate for mutual TLS; set together with `KAFKA_SSL_KEY_FILE`."),
    EnvVar("KAFKA_SSL_KEY_FILE", "(unset)", "PEM private key of `KAFKA_SSL_CERT_FILE`."),
    _secret_var("KAFKA_SSL_KEY_PASSWORD", "(unset)", "Password of an encrypted `KAFKA_SSL_KEY_FILE`."),
    EnvVar("KAFKA_SSL_CHECK_HOSTNAME", "true",
           "Check that the broker certificate names the host connected to. `false` skips only the name "
           "check; the certificate chain is always verified."),
    # Events
    EnvVar("EVENT_CODEC", "avro", "Wire format of events: `avro` (schemaless fastavro) or `json`."),
    EnvVar("EVENT_SCHEMA_PATH", "(schemas/memory-sync-event.avsc)", "Avro schema of `MemorySyncEvent`."),
    EnvVar("MAX_DOCUMENT_BYTES", "1000000",
           "Largest `data` document accepted (>= 1024); larger events go to the dead-letter topic."),
    # MongoDB
    _secret_var("MONGODB_URI", "mongodb://mongodb:27017/",
                "MongoDB connection string (`mongodb://` or `mongodb+srv://`), with credentials and TLS "
                "options such as `tls=true&tlsCAFile=...` passed through to the driver."),
    EnvVar("MONGODB_DATABASE", "memory", "Database of the operational documents."),
    EnvVar("SYNC_COLLECTIONS", "contexts,episodes,facts",
           "Comma-separated collections the batch reconciliation reads."),
    # ClickHouse
    EnvVar("CLICKHOUSE_URL", "clickhouse://default@clickhouse:9000/default",
           "`clickhouse://user@host:port/database` (native protocol), `clickhouses://...` (TLS, port "
           "9440 by default) or `chdb:///path` (embedded). No password in the URL."),
    _secret_var("CLICKHOUSE_PASSWORD", "(empty)", "Password of the ClickHouse user."),
    EnvVar("CLICKHOUSE_CA_FILE", "(system trust store)",
           "PEM CA file that verifies the server certificate; `clickhouses://` only."),
    EnvVar("CLICKHOUSE_HISTORY_TABLE", "operational_context_history", "The history table."),
    # Sink and idempotency
    EnvVar("SINK_BATCH_MAX_EVENTS", "20000", "Most events written to ClickHouse in one insert."),
    EnvVar(
        "SINK_BATCH_WITHIN_SECONDS",
        "0.2",
        "Longest wait to fill a sink batch, seconds (> 0); under load batches fill before it.",
    ),
    EnvVar("SINK_BACKOFF_MAX_SECONDS", "30.0",
           "Cap of the exponential backoff while ClickHouse is unavailable, seconds (> 0)."),
    EnvVar("IDEMPOTENCY_HORIZON_HOURS", "168",
           "How long processed event ids are remembered in the RocksDB table, hours."),
    # Batch reconciliation and retention
    EnvVar("BATCH_SIZE", "1000", "Documents per MongoDB read of the batch reconciliation (1-100000)."),
    EnvVar("SYNC_LOOKBACK_HOURS", "24", "The batch reconciliation reads documents changed this recently."),
    EnvVar("RECONCILE_SCHEDULE", "0 2 * * *", "5-field cron expression (UTC) of the batch reconciliation."),
    EnvVar("RETENTION_SCHEDULE", "0 3 * * *", "5-field cron expression (UTC) of retention enforcement."),
    EnvVar("RETENTION_POLICIES_FILE", "(unset)",
           "JSON file of per-`data_type` retention policies; not together with `RETENTION_POLICIES`."),
    EnvVar("RETENTION_POLICIES", "(unset)", "The same policies inline, as JSON."),
    # Worker
    EnvVar("MEMSYNC_DATA_DIR", "(data/ in the checkout)",
           "Worker state (RocksDB tables); one per worker, never shared."),
    EnvVar("WEB_PORT", "6066", "Port of the web views, probes and metrics."),
    EnvVar("WEB_BIND", "0.0.0.0", "Address the web server listens on."),
    EnvVar("WEB_TABLE_ROUTES_ENABLED", "false",
           "Serve Faust's `/router/` and `/table/...` views (they show table contents)."),
    EnvVar("WORKER_ID", "(the host name)", "Name of this worker in metrics, logs and dead letters."),
    EnvVar(
        "LOG_LEVEL",
        "info",
        "Level of memsync's own loggers: `debug`, `info`, `warning` or `error` (`faust -l` sets the rest).",
    ),
)

ENV_NAMES: frozenset[str] = frozenset(name for var in ENV_VARIABLES for name in var.names)


# ------------------------------------------------------------------ parsing helpers

_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    return bool(_HOSTNAME.match(host))


class _Env:
    """Typed reads of one environment mapping; every error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def str(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name} must be true or false, got {value!r}")

    def int(self, name: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise SettingsError(f"{name} must be {bound}, got {number}")
        return number

    def float(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number <= minimum:
            raise SettingsError(f"{name} must be a finite number > {minimum}, got {value!r}")
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, upper: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            return default
        normalized = value.upper() if upper else value.lower()
        if normalized not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return normalized

    def secret(self, name: str, default: str = "") -> Secret:
        """`NAME` or the contents of the file named by `NAME_FILE` (never both).

        Messages name the variable and the file, never the value.
        """
        direct = self.raw(name)
        file_name = self.raw(f"{name}_FILE")
        if direct and file_name:
            raise SettingsError(f"set {name} or {name}_FILE, not both")
        if file_name:
            try:
                value = Path(file_name).read_text().strip()
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise SettingsError(f"{name}_FILE: cannot read {file_name!r}: {reason}") from None
            except UnicodeDecodeError:
                raise SettingsError(f"{name}_FILE: {file_name!r} is not UTF-8 text") from None
            if not value:
                raise SettingsError(f"{name}_FILE: {file_name!r} is empty")
            return Secret(value)
        return Secret(direct if direct is not None else default)

    def existing_file(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and not Path(value).is_file():
            raise SettingsError(f"{name} names a file that does not exist: {value!r}")
        return value

    def cron(self, name: str, default: str) -> str:
        value = self.str(name, default)
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise SettingsError(
                f"{name} must be a 5-field cron expression (minute hour day month weekday), got {value!r}"
            )
        return value

    def names(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        if not items:
            raise SettingsError(f"{name} must list at least one name")
        return items


def _bootstrap_servers(env: _Env) -> tuple[str, ...]:
    name = "KAFKA_BOOTSTRAP_SERVERS"
    servers = env.names(name, ("kafka:9092",))
    for server in servers:
        host, sep, port = server.rpartition(":")
        if (
            not sep
            or not _valid_host(host)
            or not port.isdigit()
            or not 0 < int(port) < 65536
        ):
            raise SettingsError(
                f"{name} must be host:port[,host:port...] (no scheme), got {server!r}"
            )
    return servers


def _kafka_security(env: _Env) -> KafkaSecurity:
    protocol = env.choice("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", SECURITY_PROTOCOLS, upper=True)
    mechanism = env.choice("KAFKA_SASL_MECHANISM", "PLAIN", SASL_MECHANISMS, upper=True)
    username = env.str("KAFKA_SASL_USERNAME", "")
    password = env.secret("KAFKA_SASL_PASSWORD")
    ca_file = env.existing_file("KAFKA_SSL_CA_FILE")
    cert_file = env.existing_file("KAFKA_SSL_CERT_FILE")
    key_file = env.existing_file("KAFKA_SSL_KEY_FILE")
    key_password = env.secret("KAFKA_SSL_KEY_PASSWORD")
    security = KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        key_password=key_password,
        check_hostname=env.bool("KAFKA_SSL_CHECK_HOSTNAME", True),
    )
    if security.uses_sasl and not (username and password):
        raise SettingsError(
            f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
            "(or KAFKA_SASL_PASSWORD_FILE)"
        )
    # A credential the protocol would silently ignore is almost always a forgotten
    # KAFKA_SECURITY_PROTOCOL; the broker's refusal that follows is much harder to read than this.
    if not security.uses_sasl:
        given = [
            name for name, value in (
                ("KAFKA_SASL_USERNAME", username),
                ("KAFKA_SASL_PASSWORD", password),
            ) if value
        ]
        if given:
            raise SettingsError(
                f"{', '.join(given)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL; "
                "use SASL_SSL or SASL_PLAINTEXT, or unset them"
            )
    if not security.uses_tls:
        given = [
            name for name, value in (
                ("KAFKA_SSL_CA_FILE", ca_file),
                ("KAFKA_SSL_CERT_FILE", cert_file),
                ("KAFKA_SSL_KEY_FILE", key_file),
                ("KAFKA_SSL_KEY_PASSWORD", key_password),
            ) if value
        ]
        if given:
            raise SettingsError(
                f"{', '.join(given)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS; "
                "use SSL or SASL_SSL, or unset them"
            )
    if bool(cert_file) != bool(key_file):
        raise SettingsError("KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE must be set together")
    if key_password and not key_file:
        raise SettingsError("KAFKA_SSL_KEY_PASSWORD is set but KAFKA_SSL_KEY_FILE is not")
    return security


def load_tls_files(
    context: ssl.SSLContext,
    prefix: str,
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    key_password: Secret = NO_SECRET,
) -> None:
    """Load CA and client certificate files into `context`; a bad file raises SettingsError naming
    `<prefix>_CA_FILE` etc. (never the key password)."""
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                f"{prefix}_CA_FILE: {ca_file!r} holds no usable PEM CA certificate ({_ssl_reason(exc)})"
            ) from None
    if cert_file and key_file:
        try:
            # Always a password (maybe empty): with None, OpenSSL would prompt on the terminal.
            context.load_cert_chain(cert_file, key_file, password=key_password.value)
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                f"{prefix}_CERT_FILE/{prefix}_KEY_FILE: cannot load the client certificate and key "
                f"({_ssl_reason(exc)}); are they PEM, do they match, is {prefix}_KEY_PASSWORD right?"
            ) from None


def check_tls_files(settings: Settings) -> None:
    """Load every certificate and key file the settings name; SettingsError names the bad one.

    Not part of `from_env`, which checks only that the files exist: parsing stays independent of file
    contents (manifests are checked offline with stand-in files). Call it at start-up, so a wrong file
    stops the worker before it connects anywhere.
    """
    security = settings.kafka_security
    if security.uses_tls:
        load_tls_files(
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "KAFKA_SSL",
            security.ca_file, security.cert_file, security.key_file, security.key_password,
        )
    if settings.clickhouse.ca_file:
        load_tls_files(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "CLICKHOUSE", settings.clickhouse.ca_file)


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or type(exc).__name__


def _clickhouse(env: _Env) -> ClickHouseTarget:
    name = "CLICKHOUSE_URL"
    url = env.str(name, "clickhouse://default@clickhouse:9000/default")
    password = env.secret("CLICKHOUSE_PASSWORD")
    ca_file = env.existing_file("CLICKHOUSE_CA_FILE")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise SettingsError(f"{name} is not a URL") from None
    if parts.scheme not in CLICKHOUSE_SCHEMES:
        raise SettingsError(
            f"{name} must start with clickhouse://, clickhouses:// or chdb://, got scheme {parts.scheme!r}"
        )
    if parts.query or parts.fragment:
        # Options in the URL would be silently dropped: every supported option has its own variable.
        raise SettingsError(
            f"{name} must not carry ?options or #fragments; use clickhouses:// for TLS and "
            "CLICKHOUSE_CA_FILE for its CA"
        )
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise SettingsError(f"{name}: chdb:// needs a data directory, e.g. chdb:///var/lib/memsync/ch")
        for unused, value in (("CLICKHOUSE_PASSWORD", password), ("CLICKHOUSE_CA_FILE", ca_file)):
            if value:
                raise SettingsError(f"{unused} is set but {name} is chdb://, which has no server")
        return ClickHouseTarget(backend="chdb", path=path)
    try:
        port = parts.port
    except ValueError:
        raise SettingsError(f"{name} has an invalid port (1-65535)") from None
    if parts.password is not None:
        raise SettingsError(
            f"{name} must not carry a password; use CLICKHOUSE_PASSWORD or CLICKHOUSE_PASSWORD_FILE"
        )
    if not parts.hostname or not _valid_host(
        f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    ):
        raise SettingsError(f"{name} must name a host, e.g. clickhouse://default@clickhouse:9000/default")
    if port == 0:
        raise SettingsError(f"{name} has an invalid port (1-65535)")
    database = parts.path.lstrip("/") or "default"
    if not database.replace("_", "").isalnum():
        raise SettingsError(f"{name}: database name {database!r} must be letters, digits and underscores")
    secure = parts.scheme == "clickhouses"
    if ca_file and not secure:
        raise SettingsError(f"CLICKHOUSE_CA_FILE is set but {name} is clickhouse://; use clickhouses://")
    return ClickHouseTarget(
        backend="server",
        host=parts.hostname,
        port=port or (9440 if secure else 9000),
        database=database,
        user=unquote(parts.username or "default"),
        password=password,
        secure=secure,
        ca_file=ca_file,
    )


_SENSITIVE_MONGO_OPTIONS = ("password", "secret", "token", "authmechanismproperties")


def _mongodb_uri(env: _Env) -> Secret:
    """Validated without network access (no SRV lookup); errors never quote the URI."""
    name = "MONGODB_URI"
    uri = env.secret(name, "mongodb://mongodb:27017/")
    try:
        _split_mongodb_uri(uri.value, validate_options=True)
    except SettingsError:
        raise
    except Exception as exc:  # pymongo raises InvalidURI, ConfigurationError, ValueError, OSError...
        reason = _scrub(exc, uri.value)
        raise SettingsError(f"{name} is not a valid MongoDB connection string: {reason}") from None
    return uri


def _split_mongodb_uri(uri: str, *, validate_options: bool) -> tuple[str, str, str, str]:
    """(scheme, user, hosts, database); raises on anything the driver would refuse."""
    name = "MONGODB_URI"
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("mongodb", "mongodb+srv"):
        raise SettingsError(f"{name} must start with mongodb:// or mongodb+srv://")
    head, _, options = rest.partition("?")
    hosts, _, database = head.partition("/")
    user = ""
    if "@" in hosts:
        userinfo, _, hosts = hosts.rpartition("@")
        user, _ = parse_userinfo(userinfo)
    if not hosts:
        raise SettingsError(f"{name} must name at least one host")
    nodes = split_hosts(hosts, default_port=None if scheme == "mongodb+srv" else 27017)
    if scheme == "mongodb+srv" and (len(nodes) != 1 or nodes[0][1] is not None):
        raise SettingsError(f"{name}: mongodb+srv:// takes exactly one host name and no port")
    if options and validate_options:
        split_options(options, validate=True, warn=False)
    return scheme, user, hosts, unquote(database)


def _scrub(exc: BaseException, uri: str) -> str:
    """The driver's message with anything secret from the URI masked (defence in depth)."""
    message = str(exc)
    secrets: list[str] = []
    _, _, rest = uri.partition("://")
    userinfo = rest.partition("?")[0].partition("/")[0].rpartition("@")[0]
    if userinfo:
        secrets += [userinfo, *userinfo.split(":", 1), unquote(userinfo)]
    for pair in rest.partition("?")[2].split("&"):
        key, _, value = pair.partition("=")
        if value and any(word in key.lower() for word in _SENSITIVE_MONGO_OPTIONS):
            secrets += [value, unquote(value)]
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def redact_mongodb_uri(uri: str) -> str:
    """`scheme://user:***@hosts/database`, dropping options (some carry secrets) for logs and views."""
    try:
        scheme, user, hosts, database = _split_mongodb_uri(uri, validate_options=False)
    except Exception:  # never let a description raise, nor echo what it could not parse
        return "(invalid MongoDB URI)"
    credentials = f"{user}:***@" if user else ""
    return f"{scheme}://{credentials}{hosts}/{database}"


def _identifier(env: _Env, name: str, default: str) -> str:
    value = env.str(name, default)
    if not value.replace("_", "").isalnum():
        raise SettingsError(f"{name} must be letters, digits and underscores, got {value!r}")
    return value


def _topic(env: _Env, name: str, default: str) -> str:
    value = env.str(name, default)
    if not all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in value) or len(value) > 249:
        raise SettingsError(f"{name} is not a valid Kafka topic name: {value!r}")
    if value in (".", ".."):
        raise SettingsError(f"{name} is not a valid Kafka topic name: {value!r}")
    return value


def _web_bind(env: _Env) -> str:
    name = "WEB_BIND"
    value = env.str(name, "0.0.0.0")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _valid_host(value):
            raise SettingsError(f"{name} must be an IP address or a host name, got {value!r}") from None
    return value


def _retention_policies(env: _Env) -> tuple[str | None, str | None]:
    policies_file = env.existing_file("RETENTION_POLICIES_FILE")
    inline = env.raw("RETENTION_POLICIES")
    if policies_file and inline:
        raise SettingsError("set RETENTION_POLICIES or RETENTION_POLICIES_FILE, not both")
    if inline is not None:
        try:
            json.loads(inline)
        except ValueError as exc:
            raise SettingsError(f"RETENTION_POLICIES is not valid JSON: {exc}") from None
    return policies_file, inline


def _path(env: _Env, name: str, default: Path, *, must_exist: bool = False) -> Path:
    value = env.raw(name)
    if value is None:
        return default
    path = Path(value)
    if must_exist and not path.is_file():
        raise SettingsError(f"{name} names a file that does not exist: {value!r}")
    if not must_exist and path.exists() and not path.is_dir():
        raise SettingsError(f"{name} must be a directory, got the file {value!r}")
    return path


def _parse(mapping: Mapping[str, str]) -> Settings:
    env = _Env(mapping)
    defaults = Settings.__dataclass_fields__
    sync_topic = _topic(env, "KAFKA_SYNC_TOPIC", "memory.sync.events")
    retention_policies_file, retention_policies_json = _retention_policies(env)
    return Settings(
        enable_realtime_sync=env.bool("ENABLE_REALTIME_SYNC", True),
        kafka_bootstrap_servers=_bootstrap_servers(env),
        sync_topic=sync_topic,
        dlq_topic=_topic(env, "KAFKA_DLQ_TOPIC", f"{sync_topic}.dlq"),
        retry_topic=_topic(env, "KAFKA_RETRY_TOPIC", f"{sync_topic}.retry"),
        control_topic=_topic(env, "KAFKA_CONTROL_TOPIC", "memsync.control"),
        consumer_group=_topic(env, "KAFKA_CONSUMER_GROUP", "memory-sync-consumer"),
        topic_partitions=env.int("KAFKA_TOPIC_PARTITIONS", 8, maximum=1024),
        max_partition_fetch_bytes=env.int(
            "KAFKA_MAX_PARTITION_FETCH_BYTES", 8 * 1024 * 1024, minimum=1024 * 1024, maximum=256 * 1024 * 1024
        ),
        topic_replication_factor=env.int("KAFKA_REPLICATION_FACTOR", 1, maximum=16),
        dlq_retention_ms=env.int("KAFKA_DLQ_RETENTION_MS", 7 * 24 * 3600 * 1000),
        kafka_security=_kafka_security(env),
        codec=env.choice("EVENT_CODEC", "avro", CODECS),
        mongodb_uri=_mongodb_uri(env),
        mongodb_database=_identifier(env, "MONGODB_DATABASE", "memory"),
        sync_collections=env.names("SYNC_COLLECTIONS", ("contexts", "episodes", "facts")),
        clickhouse=_clickhouse(env),
        history_table=_identifier(env, "CLICKHOUSE_HISTORY_TABLE", "operational_context_history"),
        batch_size=env.int("BATCH_SIZE", 1000, maximum=100_000),
        sync_lookback_hours=env.int("SYNC_LOOKBACK_HOURS", 24, maximum=24 * 366),
        sink_batch_max_events=env.int("SINK_BATCH_MAX_EVENTS", 20000, maximum=1_000_000),
        sink_batch_within_s=env.float("SINK_BATCH_WITHIN_SECONDS", 0.2),
        sink_backoff_max_s=env.float("SINK_BACKOFF_MAX_SECONDS", 30.0),
        max_document_bytes=env.int("MAX_DOCUMENT_BYTES", 1_000_000, minimum=1024),
        idempotency_horizon_hours=env.int("IDEMPOTENCY_HORIZON_HOURS", 168),
        reconcile_schedule=env.cron("RECONCILE_SCHEDULE", "0 2 * * *"),
        retention_schedule=env.cron("RETENTION_SCHEDULE", "0 3 * * *"),
        retention_policies_file=retention_policies_file,
        retention_policies_json=retention_policies_json,
        data_dir=_path(env, "MEMSYNC_DATA_DIR", defaults["data_dir"].default),
        web_port=env.int("WEB_PORT", 6066, maximum=65535),
        web_bind=_web_bind(env),
        web_table_routes_enabled=env.bool("WEB_TABLE_ROUTES_ENABLED", False),
        worker_id=env.str("WORKER_ID", socket.gethostname()),
        log_level=env.choice("LOG_LEVEL", "info", LOG_LEVELS),
        schema_path=_path(env, "EVENT_SCHEMA_PATH", defaults["schema_path"].default, must_exist=True),
    )
