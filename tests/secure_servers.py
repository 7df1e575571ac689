"""Throwaway ClickHouse 18.16 and FerretDB servers that speak TLS and check passwords, for
tests/integration/test_store_tls.py.

The local stack's servers are plaintext and password-less; these are separate processes with their own
temporary directories, on free ports of 127.0.0.1 only:

- ClickHouse 18.16 (Debian's clickhouse-server, as `scripts/stack` runs it) with the native protocol on
  `tcp_port_secure` (TLS, the server certificate below) and on a plaintext `tcp_port`, and one user,
  `memsync`, whose password is stored as `password_sha256_hex`. 18.16 cannot require TLS of a user
  (users.xml has no such setting): a deployment that wants TLS only leaves `tcp_port` out.
- FerretDB v1.24.2 (the binary `scripts/stack install` builds) on the SQLite backend, TLS listener only
  (`--listen-addr=` turns the plaintext one off). Its default authentication on SQLite accepts any
  credentials; `--test-enable-new-auth` with `--setup-database/--setup-username` makes it store a user
  and require SCRAM, which is what these servers run.

Certificates come from tests/kafka_secure_broker.py's `make_pki` (openssl CLI): a CA, a server
certificate for IP:127.0.0.1 and DNS:localhost signed by it, and a second CA that signed nothing; plus,
made here, a certificate from the same CA for another name only (the host-name check must refuse it).
Processes are stopped by pid, and die with the test process (PR_SET_PDEATHSIG) if it is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from tests.kafka_secure_broker import free_port, make_pki, port_open, spawn, stop_process

HOST = "127.0.0.1"
USERNAME = "memsync"
FERRETDB_VERSION = "v1.24.2"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServerPki:
    ca_cert: Path
    server_cert: Path  # IP:127.0.0.1, DNS:localhost, signed by ca_cert
    server_key: Path
    untrusted_ca_cert: Path  # a valid CA that signed nothing these servers present
    wrong_name_cert: Path  # signed by ca_cert, but for DNS:elsewhere.invalid only
    wrong_name_key: Path

    def certificate(self, *, wrong_name: bool = False) -> tuple[Path, Path]:
        if wrong_name:
            return self.wrong_name_cert, self.wrong_name_key
        return self.server_cert, self.server_key


_WRONG_NAME_EXTENSIONS = """
[wrong_name]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:elsewhere.invalid
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def _openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def make_server_pki(directory: Path) -> ServerPki:
    pki = make_pki(directory)
    # make_pki's server leaf is named for its first user, the Kafka broker; any server can present it.
    cert, key = directory / "broker.pem", directory / "broker.key"
    ca_key = directory / "ca.key"
    if not (cert.is_file() and key.is_file() and ca_key.is_file()):
        raise RuntimeError(f"make_pki no longer writes broker.pem, broker.key and ca.key in {directory}")
    config = directory / "openssl.cnf"
    config.write_text(config.read_text() + _WRONG_NAME_EXTENSIONS)
    _openssl(
        directory, "req", "-config", config.name, "-new", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:P-256", "-nodes", "-keyout", "wrong-name.key", "-out", "wrong-name.csr",
        "-subj", "/CN=elsewhere.invalid",
    )
    _openssl(
        directory, "x509", "-req", "-in", "wrong-name.csr", "-CA", pki.ca_cert.name, "-CAkey", ca_key.name,
        "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2", "-out", "wrong-name.pem",
        "-extfile", config.name, "-extensions", "wrong_name",
    )
    (directory / "wrong-name.key").chmod(0o600)
    return ServerPki(
        ca_cert=pki.ca_cert,
        server_cert=cert,
        server_key=key,
        untrusted_ca_cert=pki.untrusted_ca_cert,
        wrong_name_cert=directory / "wrong-name.pem",
        wrong_name_key=directory / "wrong-name.key",
    )


def _write_secret(path: Path, value: str) -> Path:
    # A trailing newline, as `kubectl create secret --from-file` of an edited file would have.
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _log_tail(log: Path, lines: int = 40) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(name: str, process: subprocess.Popen[bytes], log: Path, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited during start-up ({process.returncode}):\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start within {timeout:.0f}s:\n{_log_tail(log)}")
        time.sleep(0.1)


# ---------------------------------------------------------------- ClickHouse 18.16


@dataclass
class SecureClickHouse:
    home: Path
    pki: ServerPki
    password: str
    tls_port: int
    plain_port: int
    wrong_name: bool = False  # presents pki.wrong_name_cert
    process: subprocess.Popen[bytes] | None = None
    username: str = USERNAME

    @property
    def password_file(self) -> Path:
        return self.home / "clickhouse-password"

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    @property
    def error_log(self) -> Path:
        return self.home / "server.err.log"

    def env(self, **overrides: str) -> dict[str, str]:
        """memsync's environment for the TLS port, the password from a file, the test CA."""
        return {
            "CLICKHOUSE_URL": f"clickhouses://{self.username}@{HOST}:{self.tls_port}/default",
            "CLICKHOUSE_PASSWORD_FILE": str(self.password_file),
            "CLICKHOUSE_CA_FILE": str(self.pki.ca_cert),
            **overrides,
        }

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20.0)


def clickhouse_binary() -> str:
    for candidate in ("/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse"):
        if Path(candidate).exists():
            return candidate
    raise RuntimeError("clickhouse-server is not installed: run scripts/bootstrap")


def _clickhouse_config(server: SecureClickHouse) -> str:
    home = server.home
    cert, key = server.pki.certificate(wrong_name=server.wrong_name)
    return f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{server.log}</log>
        <errorlog>{server.error_log}</errorlog>
        <console>false</console>
    </logger>
    <listen_host>{HOST}</listen_host>
    <tcp_port>{server.plain_port}</tcp_port>
    <tcp_port_secure>{server.tls_port}</tcp_port_secure>
    <openSSL>
        <server>
            <certificateFile>{cert}</certificateFile>
            <privateKeyFile>{key}</privateKeyFile>
            <!-- No dhParamsFile: 18.16 starts without one and negotiates ECDHE with current clients. -->
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
    <path>{home}/data/</path>
    <tmp_path>{home}/tmp/</tmp_path>
    <user_files_path>{home}/user_files/</user_files_path>
    <format_schema_path>{home}/format_schemas/</format_schema_path>
    <users_config>{home}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>20</max_concurrent_queries>
    <mlock_executable>false</mlock_executable>
</yandex>
"""


def _clickhouse_users(server: SecureClickHouse) -> str:
    digest = hashlib.sha256(server.password.encode()).hexdigest()
    return f"""<?xml version="1.0"?>
<yandex>
    <profiles><default><background_pool_size>2</background_pool_size></default></profiles>
    <users>
        <{server.username}>
            <password_sha256_hex>{digest}</password_sha256_hex>
            <networks><ip>{HOST}</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{server.username}>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"""


def start_secure_clickhouse(
    home: Path, pki: ServerPki, *, wrong_name: bool = False, timeout: float = START_TIMEOUT_S
) -> SecureClickHouse:
    home.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "tmp", "user_files", "format_schemas"):
        (home / sub).mkdir(exist_ok=True)
    server = SecureClickHouse(
        home=home,
        pki=pki,
        # Characters that would need escaping in XML or a URL: the password must travel untouched.
        password=f"Ch-{uuid.uuid4().hex}&<'\"%@:/",
        tls_port=free_port(),
        plain_port=free_port(),
        wrong_name=wrong_name,
    )
    _write_secret(server.password_file, server.password)
    (home / "config.xml").write_text(_clickhouse_config(server))
    (home / "users.xml").write_text(_clickhouse_users(server))
    server.process = spawn(
        [clickhouse_binary(), f"--config-file={home / 'config.xml'}"], log=home / "stdout.log", cwd=home
    )
    try:
        _wait_ready(
            "ClickHouse", server.process, server.log,
            lambda: port_open(server.tls_port) and port_open(server.plain_port), timeout,
        )
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_secure_clickhouse(
    home: Path, pki: ServerPki, *, wrong_name: bool = False
) -> Iterator[SecureClickHouse]:
    server = start_secure_clickhouse(home, pki, wrong_name=wrong_name)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- FerretDB (SQLite)


@dataclass
class SecureFerretDB:
    home: Path
    pki: ServerPki
    password: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    username: str = USERNAME
    auth_database: str = "memory"  # where --setup-database created the user

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    def uri(
        self,
        *,
        username: str | None = USERNAME,
        password: str | None = None,
        ca_file: Path | None = None,
        tls: bool = True,
        system_trust_store: bool = False,
        **options: str,
    ) -> str:
        """A connection string to the TLS listener: credentials percent-encoded, TLS options in the query
        (`tlsCAFile` is the test CA unless `ca_file` or `system_trust_store` says otherwise)."""
        credentials = ""
        if username is not None:
            secret = self.password if password is None else password
            credentials = f"{quote(username, safe='')}:{quote(secret, safe='')}@"
        query: dict[str, str] = {}
        if username is not None:
            query |= {"authSource": self.auth_database, "authMechanism": "SCRAM-SHA-256"}
        if tls:
            query["tls"] = "true"
            if not system_trust_store:
                query["tlsCAFile"] = str(self.pki.ca_cert if ca_file is None else ca_file)
        query |= options
        return f"mongodb://{credentials}{HOST}:{self.port}/?{urlencode(query)}"

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20.0)


def ferretdb_binary() -> Path:
    explicit = os.environ.get("MEMSYNC_FERRETDB")
    cache = Path(os.environ.get("MEMSYNC_CACHE", Path.home() / ".cache" / "memsync"))
    binary = Path(explicit) if explicit else cache / "ferretdb" / FERRETDB_VERSION / "ferretdb"
    if not binary.is_file():
        raise RuntimeError(f"FerretDB not found at {binary}: run `scripts/stack install`")
    return binary


def start_secure_ferretdb(
    home: Path, pki: ServerPki, *, wrong_name: bool = False, timeout: float = START_TIMEOUT_S
) -> SecureFerretDB:
    (home / "data").mkdir(parents=True, exist_ok=True)
    cert, key = pki.certificate(wrong_name=wrong_name)
    server = SecureFerretDB(
        home=home,
        pki=pki,
        # Characters a URI must percent-encode: the test proves the credentials survive the round trip.
        password=f"Mg-{uuid.uuid4().hex}@:/%?#",
        port=free_port(),
    )
    command = [
        str(ferretdb_binary()),
        "--handler=sqlite",
        f"--sqlite-url=file:{home / 'data'}/",
        f"--state-dir={home}",
        "--listen-addr=",  # no plaintext listener
        f"--listen-tls={HOST}:{server.port}",
        f"--listen-tls-cert-file={cert}",
        f"--listen-tls-key-file={key}",
        f"--debug-addr={HOST}:{free_port()}",
        "--telemetry=disable",
        "--log-level=info",
        "--test-enable-new-auth",
        f"--setup-database={server.auth_database}",
        f"--setup-username={server.username}",
    ]
    # The password through the environment, not argv (visible to every user in `ps`).
    env = {**os.environ, "FERRETDB_SETUP_PASSWORD": server.password}
    server.process = spawn(command, log=server.log, env=env, cwd=home)
    try:
        _wait_ready(
            "FerretDB", server.process, server.log,
            lambda: port_open(server.port) and "Listening on TLS" in _log_tail(server.log, 200), timeout,
        )
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_secure_ferretdb(
    home: Path, pki: ServerPki, *, wrong_name: bool = False
) -> Iterator[SecureFerretDB]:
    server = start_secure_ferretdb(home, pki, wrong_name=wrong_name)
    try:
        yield server
    finally:
        server.stop()
