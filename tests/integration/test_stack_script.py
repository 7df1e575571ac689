"""The stack and entry scripts as a user runs them: `scripts/stack` as a subprocess, `scripts/run`,
`scripts/test` and the Makefile's bench targets.

The stack tests use a stack directory of their own (MEMSYNC_STACK_DIR under tmp_path) and only FerretDB
(fast to start); downloads come from the usual cache. They never touch the shared stack, and stop
only the processes they started, by pid. The `scripts/run` test uses the shared stack's servers with
topics, group, table and database of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from pymongo import MongoClient

from tests.conftest import ROOT, StackEnv
from tests.worker import Scenario, free_port, poll

pytestmark = pytest.mark.integration

STACK = ROOT / "scripts" / "stack"
# What would point a child at the shared stack, or pin its ports, if inherited.
INHERITED = ("KAFKA_", "CLICKHOUSE_", "MONGODB_", "MEMSYNC_STACK_DIR", "MEMSYNC_KAFKA_PORT",
             "MEMSYNC_MONGO_PORT", "MEMSYNC_CLICKHOUSE_PORT")


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}


def alive(pid: int) -> bool:
    """Running, not a zombie: an exited server may never be reaped by this machine's init."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""


class OwnStack:
    """`scripts/stack` run against a private stack directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.started: set[int] = set()

    def note_pids(self) -> None:
        """Remember the servers this test started, so teardown can stop them even if `down` cannot."""
        for service in ("kafka", "mongo", "clickhouse"):
            pid = self.pid(service)
            if pid is not None and str(self.dir) in cmdline(pid):
                self.started.add(pid)

    def env(self, **extra: str) -> dict[str, str]:
        return {**clean_environment(), "MEMSYNC_STACK_DIR": str(self.dir), **extra}

    def run(self, *args: str, timeout: float = 150, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(STACK), *args], env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )

    def pid(self, service: str) -> int | None:
        path = self.dir / service / "pid"
        return int(path.read_text()) if path.exists() else None

    def write_ports(self, **ports: int) -> None:
        """ports.json as the stack keeps it: free ports unless given."""
        names = ("kafka", "kafka_controller", "mongo", "mongo_debug", "clickhouse", "clickhouse_http")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "ports.json").write_text(json.dumps({n: ports.get(n) or free_port() for n in names}))

    def ports(self) -> dict[str, int]:
        return json.loads((self.dir / "ports.json").read_text())


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[OwnStack]:
    stack = OwnStack(tmp_path / "stack")
    yield stack
    stack.note_pids()
    stack.run("down", timeout=60)
    # Whatever `down` missed, by pid, and only if it still runs from this test's stack directory.
    for pid in stack.started:
        if alive(pid) and str(stack.dir) in cmdline(pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port some other process (here: the test itself) listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# ------------------------------------------------------------------ scripts/stack


def test_up_refuses_a_mongo_port_already_in_use(own_stack):
    with occupied_port() as port:
        result = own_stack.run("up", "mongo", MEMSYNC_MONGO_PORT=str(port))
    assert result.returncode != 0, result.stderr
    assert f"port {port}" in result.stderr, result.stderr
    assert "already in use" in result.stderr, result.stderr
    # Refused before spawning: an open port is taken for readiness, so a FerretDB started here would
    # have been reported up while the foreign listener answered.
    assert own_stack.pid("mongo") is None
    assert "export MONGODB_URI" not in result.stdout


def test_up_refuses_a_side_port_already_in_use(own_stack):
    with occupied_port() as port:
        own_stack.write_ports(mongo_debug=port)
        result = own_stack.run("up", "mongo")
    assert result.returncode != 0, result.stderr
    assert f"port {port} (FerretDB debug)" in result.stderr, result.stderr
    assert own_stack.pid("mongo") is None


def test_clickhouse_that_fails_to_start_shows_its_error_log(own_stack):
    # Native and HTTP on one port: both are free beforehand, and the server fails binding the second.
    port = free_port()
    own_stack.write_ports(clickhouse=port, clickhouse_http=port)
    result = own_stack.run("up", "clickhouse")
    own_stack.note_pids()
    assert result.returncode != 0, result.stderr
    assert "clickhouse exited during start-up" in result.stderr, result.stderr
    # The reason is only in clickhouse-server.err.log; server.log just says where errors go.
    assert "clickhouse-server.err.log (last" in result.stderr, result.stderr
    assert f"Address already in use: 127.0.0.1:{port}" in result.stderr, result.stderr


def test_down_leaves_a_foreign_process_alive(own_stack):
    # A pid file whose pid now belongs to someone else (recycled, or written by hand).
    foreign = subprocess.Popen(["sleep", "300"])
    try:
        (own_stack.dir / "mongo").mkdir(parents=True)
        (own_stack.dir / "mongo" / "pid").write_text(str(foreign.pid))
        result = own_stack.run("down", timeout=60)
        assert result.returncode == 0, result.stderr
        assert foreign.poll() is None, "down killed a process it did not start"
        assert "mongo: stopped" not in result.stderr
        assert own_stack.pid("mongo") is None, "the stale pid file is dropped"
    finally:
        foreign.kill()
        foreign.wait(10)


def test_up_status_and_down_of_ferretdb(own_stack):
    result = own_stack.run("up", "mongo")
    own_stack.note_pids()
    assert result.returncode == 0, result.stderr
    port = own_stack.ports()["mongo"]
    pid = own_stack.pid("mongo")
    assert pid is not None
    assert alive(pid)
    assert str(own_stack.dir) in cmdline(pid)
    with MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=5000) as client:
        assert client.admin.command("ping")["ok"] == 1

    # Again while running: reused, not refused because its own port is taken.
    again = own_stack.run("up", "mongo")
    assert again.returncode == 0, again.stderr
    assert own_stack.pid("mongo") == pid

    # What the README tells users to do with the output.
    shell = subprocess.run(
        ["bash", "-c", f'eval "$({STACK} status)"; echo "$MONGODB_URI"; echo "$MEMSYNC_STACK_DIR"'],
        env=own_stack.env(), capture_output=True, text=True, timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == [f"mongodb://127.0.0.1:{port}/", str(own_stack.dir)]

    # An explicit port that contradicts the running server is an error, not exports that lie.
    other = free_port()
    status = own_stack.run("status", MEMSYNC_MONGO_PORT=str(other))
    assert status.returncode != 0
    assert f"MEMSYNC_MONGO_PORT={other}" in status.stderr, status.stderr
    assert f"running on port {port}" in status.stderr, status.stderr

    down = own_stack.run("down", timeout=60)
    assert down.returncode == 0, down.stderr
    assert "mongo: stopped" in down.stderr
    assert poll(lambda: not alive(pid), 10, 0.1), "FerretDB still runs after down"
    assert own_stack.pid("mongo") is None

    # Stopped, the explicit port wins over ports.json (it used to be read on the first `up` only).
    moved = own_stack.run("up", "mongo", MEMSYNC_MONGO_PORT=str(other))
    own_stack.note_pids()
    assert moved.returncode == 0, moved.stderr
    assert f"export MONGODB_URI=mongodb://127.0.0.1:{other}/" in moved.stdout.splitlines()
    assert own_stack.ports()["mongo"] == other
    with MongoClient(f"mongodb://127.0.0.1:{other}/", serverSelectionTimeoutMS=5000) as client:
        assert client.admin.command("ping")["ok"] == 1


def test_kafka_pom_pins_the_dependency_plugin():
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(ROOT / "scripts" / "kafka-pom.xml")
    plugins = {
        p.findtext("m:artifactId", namespaces=ns): p.findtext("m:version", namespaces=ns)
        for p in pom.getroot().iterfind("m:build/m:plugins/m:plugin", ns)
    }
    assert plugins.get("maven-dependency-plugin"), "pin the plugin scripts/stack runs"


# ------------------------------------------------------------------ scripts that call `stack up`

FAILED_UP_COMMANDS = {
    "scripts/run": [str(ROOT / "scripts" / "run")],
    "scripts/test": [str(ROOT / "scripts" / "test"), "--collect-only", "-q", "tests/unit/test_container.py"],
    "make bench-realtime": ["make", "-s", "-o", "deps", "bench-realtime", "VENV_PYTHON=echo BENCH-RAN"],
    "make bench-batch": ["make", "-s", "-o", "deps", "bench-batch", "VENV_PYTHON=echo BENCH-RAN"],
}


@pytest.mark.parametrize("command", sorted(FAILED_UP_COMMANDS))
def test_a_failed_stack_up_stops_the_command(own_stack, command):
    with occupied_port() as port:
        # Kafka comes first and its port is checked before anything is installed or spawned.
        own_stack.write_ports(kafka=port)
        process = subprocess.Popen(
            FAILED_UP_COMMANDS[command], cwd=ROOT, env=own_stack.env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    assert process.returncode != 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    failure = next(i for i, line in enumerate(lines) if f"port {port}" in line and "already in use" in line)
    after = lines[failure + 1:]
    # Nothing ran after the failed `up`: no worker, no pytest, no bench; only make's own error line
    # ("make[1]: ***" when the suite itself runs under make, as `make test` does).
    assert all(re.match(r"make(\[\d+\])?: \*\*\*", line) for line in after), output
    assert "BENCH-RAN" not in output


# ------------------------------------------------------------------ make run


def test_scripts_run_serves_a_ready_worker_and_stops_on_sigterm(stack: StackEnv, tmp_path):
    def shared_status() -> list[str]:
        result = subprocess.run(
            [str(STACK), "status"], env={**clean_environment(), "MEMSYNC_STACK_DIR": str(stack.stack_dir)},
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        # "# kafka: running (pid N)" for each service
        return [line for line in result.stdout.splitlines() if line.startswith("#")]

    before = shared_status()
    scenario = Scenario(stack, "run" + os.urandom(5).hex(), tmp_path)
    web_port = free_port()
    log_path = tmp_path / "run.log"
    env = {
        **clean_environment(),
        "MEMSYNC_STACK_DIR": str(stack.stack_dir),
        **scenario.env(WEB_PORT=str(web_port), MEMSYNC_DATA_DIR=str(tmp_path / "data"), WORKER_ID="run"),
    }

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    def readyz() -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/readyz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "run")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    pgid = process.pid  # its own session, so its own group: nothing else is signalled
    try:
        ready = poll(lambda: process.poll() is not None or readyz() == 200, 120, 1.0)
        assert process.poll() is None, f"scripts/run exited ({process.returncode}):\n{log()[-4000:]}"
        assert ready, f"/readyz did not answer 200 within 120s:\n{log()[-4000:]}"
        os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within 60s of SIGTERM:\n{log()[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            process.wait(30)
    assert readyz() is None, "the web port still answers after the worker exited"
    # scripts/run leaves the shared stack as it found it.
    assert shared_status() == before
