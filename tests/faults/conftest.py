"""Fixtures of the fault-injection suite: an isolated pipeline per test, the stack's services (always
left running), and the workers a test started (always stopped).

The numbers each scenario measures are printed in pytest's summary ("fault-injection measurements").
MEMSYNC_FAULTS_DEBUG=1 prints the group's lag and the row count while a test waits for the drain;
MEMSYNC_SOAK=1 runs every scenario longer (see docs/guarantees.md)."""

from __future__ import annotations

import pytest

from tests.faults import harness
from tests.worker import Scenario


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)
            if harness.SOAK:
                item.add_marker(pytest.mark.soak)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.MEASUREMENTS:
        terminalreporter.section("fault-injection measurements")
        for line in harness.MEASUREMENTS:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _producers_cancelled():
    yield
    harness.cancel_producers()


@pytest.fixture
def scenario(stack, unique_name, tmp_path) -> Scenario:
    return Scenario(stack, unique_name, tmp_path, partitions=4)


@pytest.fixture
def services(stack):
    """scripts/stack on the tests' stack. Kafka and ClickHouse are up again when the test ends,
    whatever it did to them, so the next test finds a healthy stack."""
    control = harness.StackControl(stack)
    yield control
    control.ensure_up()


@pytest.fixture
def workers():
    """Workers started by the test (append them); stopped at the end, killed if they do not stop."""
    started: list[harness.FaultWorker] = []
    yield started
    for worker in started:
        worker.stop(timeout=30)


@pytest.fixture
def history(scenario):
    view = harness.History(scenario)
    yield view
    view.close()
