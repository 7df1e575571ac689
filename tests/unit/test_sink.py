"""The sink's decisions, with in-memory stand-ins for ClickHouse, the table and the DLQ lane.

(The same code runs against the real servers in tests/integration and tests/faults.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from app import docjson
from app.codecs import encode_event
from app.history import HistoryRow, RowsRejected, SinkUnavailable
from app.identity import event_id_for
from app.sink import REPLAY_HEADER, Failure, HistorySink, decode_batch, dedup_token


def make_event(
    i: int,
    *,
    codec: str = "avro",
    data: str | None = None,
    version: int = 1,
    headers=None,
    partition: int = 0,
    payload: bytes | None = None,
):
    entity = f"e{i}"
    if payload is None:
        document = docjson.normalise({"_id": entity, "n": i, "version": version})
        event = {
            "event_id": event_id_for("contexts", entity, version),
            "entity_id": entity,
            "data_type": "context",
            "operation": "INSERT" if version == 1 else "UPDATE",
            "collection": "contexts",
            "timestamp": 1_700_000_000_000 + i,
            "data": data if data is not None else docjson.encode(document),
            "metadata": None,
        }
        payload = encode_event(event, codec)
    message = SimpleNamespace(
        value=payload,
        key=entity.encode(),
        headers=headers or [],
        partition=partition,
        topic="memory.sync.events",
        offset=i,
    )
    return SimpleNamespace(message=message)


@dataclass
class FakeHistory:
    rows: list[HistoryRow] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    lookups: int = 0
    unavailable_for: int = 0
    reject_ids: set[str] = field(default_factory=set)
    insert_delay_s: float = 0.0

    async def ensure_schema(self) -> None:
        return None

    async def insert(self, rows: Sequence[HistoryRow], dedup_token: str | None = None) -> None:
        if self.insert_delay_s:
            await asyncio.sleep(self.insert_delay_s)
        if self.unavailable_for > 0:
            self.unavailable_for -= 1
            raise SinkUnavailable("Connection refused", code=210)
        if any(r.event_id in self.reject_ids for r in rows):
            raise RowsRejected("Cannot parse input", code=27)
        self.rows.extend(rows)
        self.tokens.append(dedup_token or "")

    async def existing_event_ids(self, keys: Sequence[tuple[str, str]]) -> set[str]:
        self.lookups += 1
        present = {r.event_id for r in self.rows}
        return {event_id for _, event_id in keys if event_id in present}


@dataclass
class FakeIndex:
    ids: set[str] = field(default_factory=set)

    def known(self, pairs):
        return {event_id for _, event_id in pairs if event_id in self.ids}

    async def mark(self, pairs):
        self.ids.update(event_id for _, event_id in pairs)


@dataclass
class FakeRoute:
    routed: list[Failure] = field(default_factory=list)

    async def route(self, failures):
        self.routed.extend(failures)


def make_sink(history=None, index=None, route=None) -> HistorySink:
    return HistorySink(
        history or FakeHistory(),
        index or FakeIndex(),
        route or FakeRoute(),
        codec="avro",
        max_document_bytes=10_000,
        backoff_max_s=0.01,
        topic="memory.sync.events",
    )


def run(coro):
    return asyncio.run(coro)


def test_batch_is_written_once_and_marked():
    sink = make_sink()
    events = [make_event(i) for i in range(100)]
    report = run(sink.handle(events))
    assert report.written == 100
    assert len(sink.history.rows) == 100
    assert sink.index.ids == {r.event_id for r in sink.history.rows}
    assert sink.history.lookups == 1  # one ClickHouse lookup per batch, not per event


def test_duplicates_inside_a_batch_and_across_batches_are_skipped_by_the_right_layer():
    sink = make_sink()
    run(sink.handle([make_event(1), make_event(1), make_event(2)]))
    assert len(sink.history.rows) == 2
    report = run(sink.handle([make_event(1), make_event(2), make_event(3)]))
    assert report.duplicates == {"table": 2}
    assert len(sink.history.rows) == 3


def test_ids_missing_from_the_table_but_in_clickhouse_are_not_written_again():
    history = FakeHistory()
    sink = make_sink(history=history)
    run(sink.handle([make_event(1), make_event(2)]))
    sink.index.ids.clear()  # the table lost its state (crash before the changelog write)
    report = run(sink.handle([make_event(1), make_event(2), make_event(3)]))
    assert report.duplicates == {"clickhouse": 2}
    assert len(history.rows) == 3
    assert {event_id_for("contexts", "e1", 1)} <= sink.index.ids  # re-learned


def test_sink_outage_holds_the_batch_and_resumes_without_failures():
    history = FakeHistory(unavailable_for=3)
    route = FakeRoute()
    sink = make_sink(history=history, route=route)
    report = run(sink.handle([make_event(i) for i in range(10)]))
    assert report.written == 10
    assert route.routed == []  # nothing goes to the DLQ for a sink outage
    assert not sink.state.waiting
    assert len(history.tokens) == 1


def test_sink_state_reports_waiting_while_clickhouse_is_down():
    history = FakeHistory(unavailable_for=10**9)
    sink = make_sink(history=history)

    async def scenario():
        task = asyncio.create_task(sink.handle([make_event(1)]))
        await asyncio.sleep(0.3)
        assert sink.state.waiting
        assert "Connection refused" in sink.state.reason
        history.unavailable_for = 0
        return await asyncio.wait_for(task, 5)

    assert run(scenario()).written == 1
    assert not sink.state.waiting


def test_rejected_rows_are_isolated_and_the_rest_written():
    history = FakeHistory(reject_ids={event_id_for("contexts", "e7", 1), event_id_for("contexts", "e30", 1)})
    route = FakeRoute()
    sink = make_sink(history=history, route=route)
    report = run(sink.handle([make_event(i) for i in range(50)]))
    assert report.written == 48
    assert sorted(f.event.message.offset for f in route.routed) == [7, 30]
    assert all(f.error_class == "rejected_by_clickhouse" and f.retryable for f in route.routed)


@pytest.mark.parametrize(
    ("event", "error_class", "retryable"),
    [
        (make_event(1, payload=b"\x01garbage"), "undecodable", False),
        (make_event(1, payload=None, data="{not json"), "invalid_data", True),
        (make_event(1, data='"a string"'), "invalid_data", True),
        (make_event(1, data='{"version": "x"}'), "invalid_data", True),
        (make_event(1, data='{"pad": "' + "x" * 20_000 + '"}'), "too_large", True),
    ],
)
def test_record_level_failures_are_classified(event, error_class, retryable):
    decoded, failures = decode_batch([event], codec="avro", max_document_bytes=10_000)
    assert decoded == []
    assert [(f.error_class, f.retryable) for f in failures] == [(error_class, retryable)]


def test_poison_does_not_block_the_good_records():
    route = FakeRoute()
    sink = make_sink(route=route)
    events = (
        [make_event(i) for i in range(5)]
        + [make_event(99, payload=b"junk")]
        + [make_event(i) for i in range(5, 9)]
    )
    report = run(sink.handle(events))
    assert report.written == 9
    assert [f.error_class for f in route.routed] == ["undecodable"]


def test_version_comes_from_the_document():
    decoded, _ = decode_batch([make_event(1, version=7)], codec="avro", max_document_bytes=10_000)
    assert decoded[0].row.version == 7


def test_replayed_records_are_marked_as_replay():
    decoded, _ = decode_batch(
        [make_event(1, headers=[(REPLAY_HEADER, b"1")])], codec="avro", max_document_bytes=10_000
    )
    assert decoded[0].row.source == "replay"


def test_dedup_token_depends_only_on_the_rows():
    rows_a, _ = decode_batch([make_event(i) for i in range(3)], codec="avro", max_document_bytes=10_000)
    rows_b, _ = decode_batch([make_event(i) for i in range(3)], codec="avro", max_document_bytes=10_000)
    assert dedup_token([d.row for d in rows_a]) == dedup_token([d.row for d in rows_b])
    assert dedup_token([d.row for d in rows_a]) != dedup_token([d.row for d in rows_a[:2]])


def test_pipelined_writer_keeps_order_acks_after_writing_and_surfaces_a_crash():
    from app.sink import PipelinedWriter

    history = FakeHistory()
    sink = make_sink(history=history)
    acked: list[int] = []

    def ack(events) -> None:
        # Acked only once their rows are in ClickHouse.
        written = {r.event_id for r in history.rows}
        for event in events:
            assert event_id_for("contexts", f"e{event.message.offset}", 1) in written
            acked.append(event.message.offset)

    async def scenario():
        writer = PipelinedWriter(sink, ack)
        for start in range(0, 30, 10):
            await writer.submit([make_event(i) for i in range(start, start + 10)])
        while len(acked) < 30:
            await asyncio.sleep(0.01)
        await writer.close()

    run(scenario())
    assert acked == list(range(30))


def test_a_batch_checked_while_the_previous_one_is_written_still_skips_its_events():
    """The writer checks batch N+1 (table, ClickHouse) while N is being inserted, so neither knows N's
    events yet; N+1's copies of them must be dropped at its commit, not inserted a second time."""
    from app.sink import PipelinedWriter

    history = FakeHistory(insert_delay_s=0.05)
    sink = make_sink(history=history)
    acked: list[int] = []

    async def scenario():
        writer = PipelinedWriter(sink, lambda events: acked.extend(e.message.offset for e in events))
        await writer.submit([make_event(i) for i in range(10)])
        await writer.submit([make_event(i) for i in range(5, 15)])  # 5..9 again
        while len(acked) < 20:
            await asyncio.sleep(0.01)
        await writer.close()

    run(scenario())
    assert sorted(r.event_id for r in history.rows) == sorted(
        event_id_for("contexts", f"e{i}", 1) for i in range(15)
    )
    assert history.lookups == 2  # batch 2 was looked up before batch 1's rows were there


def test_pipelined_writer_raises_what_stopped_it():
    from app.sink import PipelinedWriter

    sink = make_sink()

    def broken_ack(events) -> None:
        raise RuntimeError("ack failed")

    async def scenario():
        writer = PipelinedWriter(sink, broken_ack)
        await writer.submit([make_event(1)])
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match="ack failed"):
            await writer.submit([make_event(2)])
        await writer.close()

    run(scenario())


def test_dlq_view_blanks_quoted_values_from_error_messages():
    from app.deadletter import without_quoted_values

    message = "Code: 27. Cannot parse input: expected ',' before: 'confidential memory text'"
    assert "confidential" not in without_quoted_values(message)
    assert without_quoted_values(message).startswith("Code: 27. Cannot parse input")
