"""memsync configuration: the environment turned into one typed, validated object.

Every variable the service reads is declared here and nowhere else. An invalid value raises
`SettingsError` naming the variable, so a worker with a bad configuration stops at start with a
message an operator can act on. Secrets may come from `NAME` or from a file named by `NAME_FILE`
(Kubernetes Secret volumes); they are held in `Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from croniter import croniter

ROOT = Path(__file__).resolve().parent.parent

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
CODECS = ("avro", "json")
CLICKHOUSE_SCHEMES = ("clickhouse", "clickhouses", "chdb")


class SettingsError(ValueError):
    """A configuration variable is missing or invalid; the message names it."""


@dataclass(frozen=True)
class Secret:
    """A credential. Never printed: repr and str are masked."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True)
class ClickHouseTarget:
    """Where the history table lives: a ClickHouse server (native protocol) or an embedded chdb path."""

    backend: str  # "server" | "chdb"
    host: str = ""
    port: int = 9000
    database: str = "default"
    user: str = "default"
    password: Secret = Secret("")
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
    sasl_password: Secret = Secret("")
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True


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
    topic_replication_factor: int = 1
    dlq_retention_ms: int = 7 * 24 * 3600 * 1000
    kafka_security: KafkaSecurity = KafkaSecurity()
    codec: str = "avro"
    mongodb_uri: Secret = Secret("mongodb://mongodb:27017/")
    mongodb_database: str = "memory"
    sync_collections: tuple[str, ...] = ("contexts", "episodes", "facts")
    clickhouse: ClickHouseTarget = ClickHouseTarget(backend="server", host="clickhouse")
    history_table: str = "operational_context_history"
    batch_size: int = 1000
    sync_lookback_hours: int = 24
    sink_batch_max_events: int = 20000
    sink_batch_within_s: float = 1.0
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
            "codec": self.codec,
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


# ------------------------------------------------------------------ parsing helpers


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
        if number <= minimum:
            raise SettingsError(f"{name} must be > {minimum}, got {number}")
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
        """`NAME` or the contents of the file named by `NAME_FILE` (never both)."""
        direct = self.env.get(name)
        file_name = self.raw(f"{name}_FILE")
        if direct and file_name:
            raise SettingsError(f"set {name} or {name}_FILE, not both")
        if file_name:
            try:
                return Secret(Path(file_name).read_text().strip())
            except OSError as exc:
                raise SettingsError(f"{name}_FILE: cannot read {file_name!r}: {exc.strerror}") from None
        return Secret(direct if direct is not None else default)

    def existing_file(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and not Path(value).is_file():
            raise SettingsError(f"{name} names a file that does not exist: {value!r}")
        return value

    def cron(self, name: str, default: str) -> str:
        value = self.str(name, default)
        if not croniter.is_valid(value) or len(value.split()) != 5:
            raise SettingsError(f"{name} must be a 5-field cron expression, got {value!r}")
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
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"{name} must be host:port[,host:port...], got {server!r}")
    return servers


def _kafka_security(env: _Env) -> KafkaSecurity:
    protocol = env.choice("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", SECURITY_PROTOCOLS, upper=True)
    mechanism = env.choice("KAFKA_SASL_MECHANISM", "PLAIN", SASL_MECHANISMS, upper=True)
    username = env.str("KAFKA_SASL_USERNAME", "")
    password = env.secret("KAFKA_SASL_PASSWORD")
    if protocol.startswith("SASL") and not (username and password):
        raise SettingsError(
            f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
            "(or KAFKA_SASL_PASSWORD_FILE)"
        )
    cert_file = env.existing_file("KAFKA_SSL_CERT_FILE")
    key_file = env.existing_file("KAFKA_SSL_KEY_FILE")
    if bool(cert_file) != bool(key_file):
        raise SettingsError("KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE must be set together")
    return KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        ca_file=env.existing_file("KAFKA_SSL_CA_FILE"),
        cert_file=cert_file,
        key_file=key_file,
        check_hostname=env.bool("KAFKA_SSL_CHECK_HOSTNAME", True),
    )


def _clickhouse(env: _Env) -> ClickHouseTarget:
    name = "CLICKHOUSE_URL"
    url = env.str(name, "clickhouse://default@clickhouse:9000/default")
    parts = urlsplit(url)
    if parts.scheme not in CLICKHOUSE_SCHEMES:
        raise SettingsError(
            f"{name} must start with clickhouse://, clickhouses:// or chdb://, got scheme {parts.scheme!r}"
        )
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise SettingsError(f"{name}: chdb:// needs a data directory, e.g. chdb:///var/lib/memsync/ch")
        return ClickHouseTarget(backend="chdb", path=path)
    try:
        port = parts.port
    except ValueError:
        raise SettingsError(f"{name} has an invalid port") from None
    if not parts.hostname:
        raise SettingsError(f"{name} must name a host, e.g. clickhouse://default@clickhouse:9000/default")
    if parts.password:
        raise SettingsError(
            f"{name} must not carry a password; use CLICKHOUSE_PASSWORD or CLICKHOUSE_PASSWORD_FILE"
        )
    database = parts.path.lstrip("/") or "default"
    if not database.replace("_", "").isalnum():
        raise SettingsError(f"{name}: database name {database!r} must be letters, digits and underscores")
    secure = parts.scheme == "clickhouses"
    return ClickHouseTarget(
        backend="server",
        host=parts.hostname,
        port=port or (9440 if secure else 9000),
        database=database,
        user=unquote(parts.username or "default"),
        password=env.secret("CLICKHOUSE_PASSWORD"),
        secure=secure,
        ca_file=env.existing_file("CLICKHOUSE_CA_FILE"),
    )


def _mongodb_uri(env: _Env) -> Secret:
    uri = env.secret("MONGODB_URI", "mongodb://mongodb:27017/")
    if not uri.value.startswith(("mongodb://", "mongodb+srv://")):
        raise SettingsError("MONGODB_URI must start with mongodb:// or mongodb+srv://")
    return uri


def _identifier(env: _Env, name: str, default: str) -> str:
    value = env.str(name, default)
    if not value.replace("_", "").isalnum():
        raise SettingsError(f"{name} must be letters, digits and underscores, got {value!r}")
    return value


def _topic(env: _Env, name: str, default: str) -> str:
    value = env.str(name, default)
    if not all(ch.isalnum() or ch in "._-" for ch in value) or len(value) > 249:
        raise SettingsError(f"{name} is not a valid Kafka topic name: {value!r}")
    return value


def _parse(mapping: Mapping[str, str]) -> Settings:
    env = _Env(mapping)
    defaults = Settings.__dataclass_fields__
    sync_topic = _topic(env, "KAFKA_SYNC_TOPIC", "memory.sync.events")
    return Settings(
        enable_realtime_sync=env.bool("ENABLE_REALTIME_SYNC", True),
        kafka_bootstrap_servers=_bootstrap_servers(env),
        sync_topic=sync_topic,
        dlq_topic=_topic(env, "KAFKA_DLQ_TOPIC", f"{sync_topic}.dlq"),
        retry_topic=_topic(env, "KAFKA_RETRY_TOPIC", f"{sync_topic}.retry"),
        control_topic=_topic(env, "KAFKA_CONTROL_TOPIC", "memsync.control"),
        consumer_group=_topic(env, "KAFKA_CONSUMER_GROUP", "memory-sync-consumer"),
        topic_partitions=env.int("KAFKA_TOPIC_PARTITIONS", 8, maximum=1024),
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
        sink_batch_within_s=env.float("SINK_BATCH_WITHIN_SECONDS", 1.0),
        sink_backoff_max_s=env.float("SINK_BACKOFF_MAX_SECONDS", 30.0),
        max_document_bytes=env.int("MAX_DOCUMENT_BYTES", 1_000_000, minimum=1024),
        idempotency_horizon_hours=env.int("IDEMPOTENCY_HORIZON_HOURS", 168),
        reconcile_schedule=env.cron("RECONCILE_SCHEDULE", "0 2 * * *"),
        retention_schedule=env.cron("RETENTION_SCHEDULE", "0 3 * * *"),
        retention_policies_file=env.existing_file("RETENTION_POLICIES_FILE"),
        retention_policies_json=env.raw("RETENTION_POLICIES"),
        data_dir=Path(env.str("MEMSYNC_DATA_DIR", str(defaults["data_dir"].default))),
        web_port=env.int("WEB_PORT", 6066, maximum=65535),
        web_bind=env.str("WEB_BIND", "0.0.0.0"),
        web_table_routes_enabled=env.bool("WEB_TABLE_ROUTES_ENABLED", False),
        worker_id=env.str("WORKER_ID", socket.gethostname()),
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        schema_path=Path(env.str("EVENT_SCHEMA_PATH", str(defaults["schema_path"].default))),
    )
