"""Scenario 4b: the INSERT lands, its acknowledgement does not.

Killing the server (scenario 4) rarely hits the few milliseconds between "block written" and "answer
sent", yet that is the case deduplication exists for: the worker cannot tell a lost insert from a
written one. Here a TCP proxy between the worker and the real ClickHouse server (fault injection in
the manner of Toxiproxy; both ends are real) lets an INSERT and its data through, waits for the
server's answer (sent after the block is written) and cuts the connection instead of delivering it.

The worker sees a dropped connection (sink-level), retries the same batch, and on 18.16 (no
insert_deduplication_token) app/history.py first looks up which rows are already there: all of them.
Nothing is inserted twice, which the audit view (every insert, whatever merges do) confirms.
"""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

from tests.faults.harness import (
    SOAK,
    FaultWorker,
    Timer,
    assert_audit_clean,
    assert_exactly_once,
    assert_no_dead_letters,
    expected_ids,
    make_events,
    measure,
    produce,
    scaled,
    wait_drained,
    wait_until,
)
from tests.worker import free_port

pytestmark = pytest.mark.timeout(1200 if SOAK else 300)


class AnswerCuttingProxy(threading.Thread):
    """Forwards ClickHouse's native protocol; `arm()` makes it swallow the answer to the next INSERT.

    The client (clickhouse-driver) sends the query, waits for the table's header block, sends its data,
    then waits for the answer. So on one connection: query bytes with "INSERT INTO" -> the server's
    header -> the client's data -> the server's answer, which an armed proxy replaces by a reset.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(daemon=True)
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.armed = 0
        self.cuts = 0
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def arm(self) -> None:
        self.armed += 1

    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            self.loop.close()

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        phase = ["idle"]  # idle -> query -> header -> data (only for an armed INSERT)

        def cut() -> None:
            client_writer.transport.abort()
            up_writer.transport.abort()

        async def client_to_server() -> None:
            while data := await client_reader.read(65536):
                if phase[0] == "idle" and b"INSERT INTO" in data and self.armed > 0:
                    self.armed -= 1
                    phase[0] = "query"
                elif phase[0] == "header":
                    phase[0] = "data"
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if phase[0] == "query":
                    phase[0] = "header"
                elif phase[0] == "data":
                    # The server answers the INSERT only after writing its block: drop the answer.
                    self.cuts += 1
                    cut()
                    return
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        try:
            await asyncio.gather(client_to_server(), server_to_client())
        except (ConnectionError, OSError):
            cut()


def test_insert_written_but_its_answer_lost(scenario, workers, history):
    history.install_audit()
    target = scenario.settings().clickhouse
    proxy = AnswerCuttingProxy(target.host, target.port)
    proxy.start()
    assert proxy.ready.wait(10)
    try:
        events = make_events(scaled(20_000))
        expected = expected_ids(events)
        worker = FaultWorker(scenario, CLICKHOUSE_URL=f"clickhouse://default@127.0.0.1:{proxy.port}/default")
        workers.append(worker)
        worker.start()
        timer = Timer()
        producer = produce(scenario.stack.kafka_bootstrap, scenario.settings().sync_topic, events, rate=800)
        marks = [0.1 * k for k in range(1, 10)] if SOAK else [0.2, 0.5, 0.8]
        for number, fraction in enumerate(marks, start=1):
            wait_until(
                lambda f=fraction: (history.count() or 0) >= f * len(expected),
                300,
                f"{fraction:.0%} of the rows",
                [worker],
                interval=0.2,
            )
            proxy.arm()
            wait_until(lambda n=number: proxy.cuts >= n, 60, f"cut #{number}", [worker], interval=0.05)
        producer.join_checked()
        wait_drained(scenario, history, len(expected), workers=[worker])
        took = timer.elapsed()
    finally:
        proxy.stop()
    assert worker.alive()
    assert_exactly_once(history, expected)
    assert_audit_clean(history, expected)
    assert_no_dead_letters(scenario)
    # Every cut answer was followed by a retry that found the whole batch already written.
    found = re.findall(r"retried insert \w+: (\d+) of (\d+) rows already written", worker.log())
    assert len(found) == len(marks), found
    assert all(present == total for present, total in found), found
    measure(
        f"scenario 4b (INSERT written, answer cut x{len(marks)}): {len(expected)} events exactly once in "
        f"{took:.0f}s; each retry found its batch already written "
        f"({', '.join(p for p, _ in found)} rows) and inserted nothing"
    )
