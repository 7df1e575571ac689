"""A throwaway Kafka 4.1 broker with secured listeners, for the security tests.

The local stack's broker speaks PLAINTEXT only; these tests need the protocols production uses, so they
start their own broker (same jars as `scripts/stack`, KRaft combined mode) with:

- SASL_SSL        SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN over TLS (what production runs)
- SSL             TLS with a required client certificate (mutual TLS)
- SASL_PLAINTEXT  the same SASL mechanisms without TLS
- INTERNAL        PLAINTEXT, loopback, for inter-broker traffic only; CONTROLLER likewise

The CA, the broker's and a client's certificates are made here with the openssl CLI; a second,
unrelated CA stands for "a CA the client trusts but that did not sign the broker". SCRAM users are
written into the cluster metadata by Kafka's own `StorageTool format --add-scram`.

Everything runs on 127.0.0.1 on free ports; the broker is stopped by its pid, and it also dies with the
process that started it (PR_SET_PDEATHSIG), so a killed test run leaves no JVM behind.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parent.parent
FAUST = str(Path(sys.executable).with_name("faust"))
HOST = "127.0.0.1"
KAFKA_VERSION = "4.1.1"
USERNAME = "memsync"
START_TIMEOUT_S = 90.0
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def kafka_libs() -> Path:
    """The jar directory `scripts/stack` fills (scripts/bootstrap installs it)."""
    explicit = os.environ.get("MEMSYNC_KAFKA_LIBS")
    cache = Path(os.environ.get("MEMSYNC_CACHE", Path.home() / ".cache" / "memsync"))
    libs = Path(explicit) if explicit else cache / f"kafka-{KAFKA_VERSION}" / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")) or not any(libs.glob("kafka-tools-*.jar")):
        raise RuntimeError(
            f"Kafka jars not found in {libs}: run scripts/bootstrap (or `scripts/stack install`), "
            "or point MEMSYNC_KAFKA_LIBS at a directory with kafka_2.13 and kafka-tools jars"
        )
    return libs


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies (even by SIGKILL), the kernel
    # sends the child SIGTERM, so no broker or worker outlives the run that started it.
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(cmd: list[str], *, log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a child that logs to `log`, in its own session, tied to this process's life."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    """SIGTERM by pid, SIGKILL if it lingers; returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


def http_get(port: int, path: str) -> tuple[int, bytes] | None:
    """(status, body) from the worker's web port, or None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return None


def start_worker(env: Mapping[str, str], log: Path, *, loglevel: str = "info") -> subprocess.Popen[bytes]:
    """`faust -A app worker`, as deployed, logging to `log`."""
    # Unbuffered: a worker stopped with SIGKILL still leaves every line it wrote in `log`.
    env = {**env, "PYTHONUNBUFFERED": "1"}
    return spawn([FAUST, "-A", "app", "worker", "-l", loglevel], log=log, env=env, cwd=ROOT)


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    broker_keystore: Path  # PEM: the broker's private key followed by its certificate chain
    client_cert: Path
    client_key: Path
    untrusted_ca_cert: Path  # a valid CA that signed nothing the broker presents


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def _openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        directory, "req", "-config", "openssl.cnf", "-x509", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key.name, "-out", cert.name,
        "-days", "2", "-subj", f"/CN=memsync test {name}", "-extensions", "ca",
    )
    return key, cert


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, cert, csr = directory / f"{name}.key", directory / f"{name}.pem", directory / f"{name}.csr"
    _openssl(
        directory, "req", "-config", "openssl.cnf", "-new", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key.name, "-out", csr.name,
        "-subj", f"/CN={name}",
    )
    _openssl(
        directory, "x509", "-req", "-in", csr.name, "-CA", ca[1].name, "-CAkey", ca[0].name,
        "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2", "-out", cert.name,
        "-extfile", "openssl.cnf", "-extensions", extensions,
    )
    return key, cert


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    ca = _make_ca(directory, "ca")
    _, untrusted_ca = _make_ca(directory, "untrusted-ca")
    broker_key, broker_cert = _make_leaf(directory, "broker", ca, "server")
    client_key, client_cert = _make_leaf(directory, "client", ca, "client")
    keystore = directory / "broker-keystore.pem"
    keystore.write_text(broker_key.read_text() + broker_cert.read_text() + ca[1].read_text())
    for secret in (ca[0], broker_key, client_key, keystore):
        secret.chmod(0o600)
    return Pki(
        ca_cert=ca[1],
        broker_keystore=keystore,
        client_cert=client_cert,
        client_key=client_key,
        untrusted_ca_cert=untrusted_ca,
    )


# ---------------------------------------------------------------- the broker


@dataclass
class SecureBroker:
    home: Path
    pki: Pki
    password: str
    sasl_ssl_port: int
    ssl_port: int
    sasl_plaintext_port: int
    internal_port: int
    controller_port: int
    process: subprocess.Popen[bytes] | None = None
    username: str = USERNAME
    password_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.password_file = self.home / "kafka-password"

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    def address(self, port: int) -> str:
        return f"{HOST}:{port}"

    @property
    def sasl_ssl(self) -> str:
        return self.address(self.sasl_ssl_port)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def memsync_env(self, **overrides: str) -> dict[str, str]:
        """memsync's environment for the SASL_SSL listener with SCRAM-SHA-512 (production's shape)."""
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.sasl_ssl,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": self.username,
            "KAFKA_SASL_PASSWORD_FILE": str(self.password_file),
            "KAFKA_SSL_CA_FILE": str(self.pki.ca_cert),
            "KAFKA_SSL_CHECK_HOSTNAME": "true",
            "KAFKA_TOPIC_PARTITIONS": "1",
        }
        env.update(overrides)
        return env

    def worker_env(self, workdir: Path, group: str, **overrides: str) -> dict[str, str]:
        """A worker's whole environment: nothing memsync reads is inherited from the caller's."""
        inherited = {key: value for key, value in os.environ.items() if key not in ENV_NAMES}
        return {
            **inherited,
            **self.memsync_env(),
            # Nothing listens there: the worker must start without MongoDB or ClickHouse.
            "MONGODB_URI": f"mongodb://{HOST}:{free_port()}/",
            "CLICKHOUSE_URL": f"clickhouse://default@{HOST}:{free_port()}/default",
            "WEB_PORT": str(free_port()),
            "WEB_BIND": HOST,
            "MEMSYNC_DATA_DIR": str(workdir / "data"),
            "KAFKA_CONSUMER_GROUP": group,
            "KAFKA_SYNC_TOPIC": f"{group}.events",
            "KAFKA_CONTROL_TOPIC": f"{group}.control",
            "WORKER_ID": group,
            **overrides,
        }

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20.0)


def _server_properties(broker: SecureBroker) -> dict[str, str]:
    listeners = {
        "SASL_SSL": broker.sasl_ssl_port,
        "SSL": broker.ssl_port,
        "SASL_PLAINTEXT": broker.sasl_plaintext_port,
        "INTERNAL": broker.internal_port,
    }
    advertised = ",".join(f"{name}://{HOST}:{port}" for name, port in listeners.items())
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{broker.controller_port}",
        "listeners": f"{advertised},CONTROLLER://{HOST}:{broker.controller_port}",
        "advertised.listeners": advertised,
        "listener.security.protocol.map": (
            "SASL_SSL:SASL_SSL,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ),
        "inter.broker.listener.name": "INTERNAL",
        "controller.listener.names": "CONTROLLER",
        "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(broker.pki.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(broker.pki.ca_cert),
        "listener.name.ssl.ssl.client.auth": "required",
        "log.dirs": str(broker.home / "data"),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
    }
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{broker.username}="{broker.password}";'
    )
    for listener in ("sasl_ssl", "sasl_plaintext"):
        props[f"listener.name.{listener}.plain.sasl.jaas.config"] = plain
        props[f"listener.name.{listener}.scram-sha-256.sasl.jaas.config"] = scram
        props[f"listener.name.{listener}.scram-sha-512.sasl.jaas.config"] = scram
    return props


_LOG4J = (
    "status = warn\n"
    "appender.out.type = Console\nappender.out.name = out\n"
    "appender.out.layout.type = PatternLayout\nappender.out.layout.pattern = [%d] %p %m (%c)%n\n"
    "rootLogger.level = warn\nrootLogger.appenderRef.out.ref = out\n"
    "logger.server.name = kafka.server.KafkaRaftServer\nlogger.server.level = info\n"
    # Failed authentications are logged at INFO by the selector: keep them, the tests read them.
    "logger.auth.name = org.apache.kafka.common.network.Selector\nlogger.auth.level = info\n"
)


def start_secure_broker(home: Path, *, timeout: float = START_TIMEOUT_S) -> SecureBroker:
    libs = kafka_libs()
    home.mkdir(parents=True, exist_ok=True)
    # Letters and digits only: the password travels inside a JAAS string and a `[name=...]` spec.
    password = "kafka" + uuid.uuid4().hex
    broker = SecureBroker(
        home=home,
        pki=make_pki(home / "pki"),
        password=password,
        sasl_ssl_port=free_port(),
        ssl_port=free_port(),
        sasl_plaintext_port=free_port(),
        internal_port=free_port(),
        controller_port=free_port(),
    )
    broker.password_file.write_text(password + "\n")
    broker.password_file.chmod(0o600)
    config = home / "server.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in _server_properties(broker).items()))
    config.chmod(0o600)
    log4j = home / "log4j2.properties"
    log4j.write_text(_LOG4J)
    java = [
        "java", "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
        "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*",
    ]
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    scram = [
        arg
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
        for arg in ("--add-scram", f"{mechanism}=[name={broker.username},password={password}]")
    ]
    formatted = subprocess.run(
        # `--cluster-id=` form: a base64 id may start with "-", which argparse would take for an option.
        [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(config), *scram],
        capture_output=True, text=True, timeout=60,
    )
    if formatted.returncode != 0:
        raise RuntimeError(f"kafka StorageTool format failed:\n{formatted.stdout}{formatted.stderr}")
    broker.process = spawn([*java, "kafka.Kafka", str(config)], log=broker.log)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if broker.process.poll() is not None:
                raise RuntimeError(f"secure Kafka exited during start-up:\n{broker.log_tail()}")
            if port_open(broker.sasl_ssl_port) and "Kafka Server started" in broker.log_tail(400):
                return broker
            if time.monotonic() > deadline:
                raise RuntimeError(f"secure Kafka did not start within {timeout:.0f}s:\n{broker.log_tail()}")
            time.sleep(0.2)
    except BaseException:
        broker.stop()
        raise


@contextlib.contextmanager
def running_secure_broker(home: Path) -> Iterator[SecureBroker]:
    broker = start_secure_broker(home)
    try:
        yield broker
    finally:
        broker.stop()
