"""/readyz's decision (app.web.readiness) with the worker's state and the stores' pings faked: a
rebalance, tables still recovering, ClickHouse failing or hanging, MongoDB failing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from app import app, web


class FakeHistory:
    def __init__(self, ping: Callable[[], Awaitable[None]]) -> None:
        self.ping = ping


async def ok() -> None:
    return None


def failing(message: str) -> Callable[[], Awaitable[None]]:
    async def ping() -> None:
        raise ConnectionRefusedError(message)

    return ping


async def hanging() -> None:
    await asyncio.sleep(60)


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A healthy worker: not rebalancing, tables recovered, both stores answering."""
    state: dict[str, Any] = {"clickhouse": ok, "mongodb": ok}
    monkeypatch.setattr(app, "rebalancing", False)
    monkeypatch.setattr(web, "history", lambda: FakeHistory(lambda: state["clickhouse"]()))
    monkeypatch.setattr(web, "_mongo_ping", lambda: state["mongodb"]())
    monkeypatch.setattr(web, "PROBE_TIMEOUT_S", 0.2)
    completed = app.tables.recovery.completed
    was_set = completed.is_set()
    completed.set()
    yield state
    if not was_set:
        completed.clear()


def readiness() -> dict[str, Any]:
    return asyncio.run(web.readiness())


def test_ready_when_assigned_recovered_and_both_stores_answer(worker):
    assert readiness() == {"ready": True, "problems": {}}


def test_not_ready_while_rebalancing(worker, monkeypatch):
    monkeypatch.setattr(app, "rebalancing", True)
    assert readiness() == {"ready": False, "problems": {"kafka": "rebalancing"}}


def test_not_ready_while_tables_recover(worker):
    app.tables.recovery.completed.clear()
    report = readiness()
    assert report["ready"] is False
    assert report["problems"] == {"tables": "recovering table state from changelogs"}


def test_not_ready_when_clickhouse_refuses(worker):
    worker["clickhouse"] = failing("clickhouse:9000 refused")
    report = readiness()
    assert report["ready"] is False
    assert report["problems"] == {"clickhouse": "ConnectionRefusedError: clickhouse:9000 refused"}


def test_not_ready_when_clickhouse_does_not_answer_in_time(worker):
    worker["clickhouse"] = hanging
    report = readiness()
    assert report["ready"] is False
    assert set(report["problems"]) == {"clickhouse"}
    assert report["problems"]["clickhouse"].startswith("TimeoutError")


def test_every_problem_is_reported_at_once(worker, monkeypatch):
    monkeypatch.setattr(app, "rebalancing", True)
    worker["clickhouse"] = failing("down")
    worker["mongodb"] = failing("also down")
    report = readiness()
    assert report["ready"] is False
    assert set(report["problems"]) == {"kafka", "clickhouse", "mongodb"}
