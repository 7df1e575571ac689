"""Connection settings for plain aiokafka clients (admin, producer, consumer in CLI tools and tests).

The Faust app gets the same security through `app.factory.kafka_credentials`; both build their TLS
context here, so a worker and a tool given the same environment connect the same way.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Protocol

from aiokafka.errors import KafkaConnectionError

from app.settings import KafkaSecurity, Settings, load_tls_files


class _RedactSaslExchange(logging.Filter):
    """Masks SASL authentication payloads in aiokafka's DEBUG request/response lines.

    aiokafka logs every request struct at DEBUG, and a SaslAuthenticateRequest's bytes are the PLAIN
    password itself (or, for SCRAM, salt and proof: enough for an offline guess), so a worker run with
    `-l debug` would otherwise print them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            type(arg).__name__.startswith(("SaslAuthenticate", "SaslHandShake")) for arg in record.args
        ):
            record.args = tuple(
                f"{type(arg).__name__}(***)" if type(arg).__name__.startswith("Sasl") else arg
                for arg in record.args
            )
        return True


_SASL_REDACTION = _RedactSaslExchange()


def redact_sasl_logging() -> None:
    """Install the SASL redaction on aiokafka's connection logger (idempotent)."""
    connection_logger = logging.getLogger("aiokafka.conn")
    if _SASL_REDACTION not in connection_logger.filters:
        connection_logger.addFilter(_SASL_REDACTION)


def kafka_ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """A verifying client context: the CA file if given, else the system's trust store.

    Verification is never switched off; KAFKA_SSL_CHECK_HOSTNAME=false only skips the name check
    (brokers reached through an address their certificate does not list), the chain is still verified.
    A CA, certificate or key file that does not load raises SettingsError naming its variable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=security.ca_file)
    except (ssl.SSLError, OSError):
        # Loading it again alone raises the SettingsError that names KAFKA_SSL_CA_FILE.
        load_tls_files(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "KAFKA_SSL", security.ca_file)
        raise
    context.check_hostname = security.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    load_tls_files(context, "KAFKA_SSL", None, security.cert_file, security.key_file, security.key_password)
    return context


def kafka_security_kwargs(security: KafkaSecurity) -> dict[str, Any]:
    """aiokafka's security keyword arguments for KAFKA_SECURITY_PROTOCOL."""
    kwargs: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_tls:
        kwargs["ssl_context"] = kafka_ssl_context(security)
    if security.uses_sasl:
        redact_sasl_logging()
        kwargs["sasl_mechanism"] = security.sasl_mechanism
        kwargs["sasl_plain_username"] = security.sasl_username
        kwargs["sasl_plain_password"] = security.sasl_password.value
    return kwargs


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer/AIOKafkaConsumer/AIOKafkaAdminClient.

    Holds the SASL password in clear (aiokafka needs it): never log the returned dict.
    """
    return {
        "bootstrap_servers": list(settings.kafka_bootstrap_servers),
        **kafka_security_kwargs(settings.kafka_security),
    }


class KafkaConnectError(ConnectionError):
    """Kafka could not be reached or refused us; the message carries the reason, never a secret."""


class _Startable(Protocol):
    async def start(self) -> None: ...


class _ReasonCollector(logging.Handler):
    """Keeps aiokafka's per-broker failure lines, which say *why* (bad password, untrusted CA)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Unable connect to", "Unable to request metadata from")):
            self.reasons.append(message)


async def start_client(client: _Startable, settings: Settings) -> None:
    """`await client.start()` for a client built from `kafka_client_kwargs(settings)`.

    aiokafka raises a bare "Unable to bootstrap from [...]" and logs the actual cause separately; a
    CLI user should see the cause in the error itself, with the protocol that was tried.
    """
    collector = _ReasonCollector()
    aiokafka_logger = logging.getLogger("aiokafka")
    aiokafka_logger.addHandler(collector)
    try:
        await client.start()
    except KafkaConnectionError as exc:
        reason = collector.reasons[-1] if collector.reasons else str(exc)
        servers = ",".join(settings.kafka_bootstrap_servers)
        protocol = settings.kafka_security.protocol
        hint = ""
        if reason.endswith("closed"):
            hint = " (the broker closed the connection: does KAFKA_SECURITY_PROTOCOL match its listener?)"
        raise KafkaConnectError(
            f"cannot connect to Kafka at {servers} with KAFKA_SECURITY_PROTOCOL={protocol}: {reason}{hint}"
        ) from None
    finally:
        aiokafka_logger.removeHandler(collector)


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition numbers of `topic` ([] when it does not exist), asked of the broker.

    A plain consumer only knows a topic's partitions once it subscribed to it; the admin client asks.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka_client_kwargs(settings))
    await start_client(admin, settings)
    try:
        (description,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if description["error_code"]:
        return []
    return sorted(p["partition"] for p in description["partitions"])
