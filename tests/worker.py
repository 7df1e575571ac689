"""Real worker processes for integration and fault tests: `faust -A app worker` as a subprocess with
its own group, topics, table, database, data dir and web port; started, probed, stopped or killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.history import HistoryStore
from app.settings import Settings
from tests.conftest import ROOT, StackEnv

FAUST = str(Path(sys.executable).with_name("faust"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Scenario:
    """Names that isolate one test's pipeline from every other test's."""

    stack: StackEnv
    name: str
    workdir: Path
    partitions: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.stack.kafka_bootstrap,
            "MONGODB_URI": self.stack.mongodb_uri,
            "CLICKHOUSE_URL": self.stack.clickhouse_url,
            "KAFKA_SYNC_TOPIC": f"{self.name}.events",
            "KAFKA_CONSUMER_GROUP": f"{self.name}-group",
            "KAFKA_CONTROL_TOPIC": f"{self.name}.control",
            "KAFKA_TOPIC_PARTITIONS": str(self.partitions),
            "CLICKHOUSE_HISTORY_TABLE": f"{self.name}_history",
            "MONGODB_DATABASE": f"{self.name}_db",
            "SINK_BATCH_WITHIN_SECONDS": "0.5",
            **self.extra_env,
            **overrides,
        }

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env(self.env(**overrides))

    def history(self) -> HistoryStore:
        settings = self.settings()
        return HistoryStore.open(settings.clickhouse, settings.history_table)


class Worker:
    """One `faust -A app worker` process."""

    def __init__(self, scenario: Scenario, label: str = "w1", **env: str) -> None:
        self.scenario = scenario
        self.label = label
        self.web_port = free_port()
        self.data_dir = scenario.workdir / f"data-{label}"
        self.log_path = scenario.workdir / f"worker-{label}.log"
        self.env = scenario.env(
            WEB_PORT=str(self.web_port), MEMSYNC_DATA_DIR=str(self.data_dir), WORKER_ID=label, **env
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 90.0) -> Worker:
        log = self.log_path.open("ab")
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLICKHOUSE_"))}
        self.process = subprocess.Popen(
            [FAUST, "-A", "app", "worker", "-l", "info", "--web-port", str(self.web_port)],
            cwd=ROOT,
            env={**environment, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            wait_for(
                lambda: self.get("/healthz") is not None and "Worker ready" in self.log(),
                timeout,
                f"worker {self.label} ready",
                self.log,
            )
        return self

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def get_status(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of the samples of one metric on /metrics (optionally filtered by labels)."""
        body = self.get("/metrics")
        if body is None:
            raise AssertionError(f"worker {self.label}: /metrics did not answer")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name, _, label_text = series.partition("{")
            if metric_name != name:
                continue
            if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                continue
            total += float(value)
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def poll(condition: Callable[[], object], timeout: float, interval: float = 0.5) -> object:
    """The condition's first truthy result within `timeout` seconds, polled every `interval`; else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    return None


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, context: Callable[[], str] | None = None
) -> object:
    result = poll(condition, timeout)
    if result:
        return result
    detail = ""
    if context is not None:
        detail = "\n--- last log lines ---\n" + "\n".join(context().splitlines()[-40:])
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
