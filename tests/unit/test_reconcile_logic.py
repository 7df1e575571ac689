"""Pure logic of reconciliation and scheduling: the batch row of a document version is the real-time
path's row, keyset filters, windows, reports, scheduled times and control messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from bson import Int64, ObjectId

from agents.scheduler import scheduled_time
from app import docjson
from app.identity import now_ms_precision
from app.producer import UnifiedMemoryClient
from app.reconcile import (
    CollectionProgress,
    DocumentProblem,
    DriftReport,
    Window,
    resume_filter,
    row_for,
    scheduled_run_id,
)
from tables.schedules import FINISHED, REQUEST, ControlMessage, run_key


def stored(document_id: object, version: int) -> dict:
    return docjson.normalise(
        {
            "_id": document_id,
            "text": "é memory",
            "n": Int64(5),
            "when": datetime(2024, 1, 2, 3, 4, 5, 678000),
            "data_type": "context",
            "version": version,
            "updated_at": now_ms_precision(),
        }
    )


@pytest.mark.parametrize("document_id", [ObjectId(), "doc-1", 42, {"a": 1}])
@pytest.mark.parametrize("version", [1, 3])
def test_batch_row_is_the_real_time_row(document_id, version):
    doc = stored(document_id, version)
    # The producer's event for this stored version (the method only derives fields from its arguments).
    event = UnifiedMemoryClient._event(
        object.__new__(UnifiedMemoryClient),
        "contexts",
        doc,
        docjson.encode(doc),
        "context",
        None,
        deleted=False,
    )
    row = row_for("contexts", doc, max_document_bytes=1_000_000)
    assert (row.event_id, row.entity_id, row.data_type, row.operation, row.collection, row.event_ts_ms) == (
        event.event_id,
        event.entity_id,
        event.data_type,
        event.operation,
        event.collection,
        event.timestamp,
    )
    assert row.data == event.data
    assert (row.version, row.source, row.metadata) == (version, "batch", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": None}, "field 'version' must be a non-negative integer"),
        ({"version": True}, "field 'version' must be a non-negative integer"),
        ({"version": -1}, "field 'version' must be a non-negative integer"),
        ({"version": 1.0}, "field 'version' must be a non-negative integer"),
        ({"updated_at": "2024-01-01"}, "field 'updated_at' must be a date"),
        ({"data_type": ""}, "field 'data_type' must be a non-empty string"),
        ({"data_type": 3}, "field 'data_type' must be a non-empty string"),
        ({"text": "x" * 2000}, "over the limit of 1024 bytes"),
    ],
)
def test_documents_that_cannot_become_rows(change, message):
    doc = {**stored("d", 1), **change}
    with pytest.raises(DocumentProblem, match=message):
        row_for("contexts", doc, max_document_bytes=1024)


def test_windows():
    at = datetime(2024, 5, 2, 2, 0, tzinfo=UTC)
    window = Window.scheduled(at, 24)
    assert (window.since, window.until) == (at - timedelta(hours=24), at)
    assert window.filter() == {"updated_at": {"$gte": window.since, "$lt": window.until}}
    # Naive means UTC (as pymongo returns dates).
    assert Window(datetime(2024, 1, 1), datetime(2024, 1, 2)).since == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="empty window"):
        Window(at, at)
    assert scheduled_run_id(at) == "reconcile@2024-05-02T02:00Z" == run_key("reconcile", at)


def test_resume_filter_is_a_keyset_after_the_checkpoint():
    window = Window(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC))
    moment, last = datetime(2024, 1, 1, 12), ObjectId()
    assert resume_filter(window, moment, last) == {
        "$and": [
            window.filter(),
            {
                "$or": [
                    {"updated_at": {"$gt": moment}},
                    {"updated_at": moment, "_id": {"$gt": last}},
                    # $gt only compares within a BSON type: ids of other types at that instant are re-read.
                    {"updated_at": moment, "_id": {"$not": {"$type": "objectId"}}},
                ]
            },
        ]
    }
    assert resume_filter(window, moment, "k-1")["$and"][1]["$or"][2]["_id"] == {"$not": {"$type": "string"}}
    # An _id type without a $type alias: the whole instant is read again (idempotent).
    assert resume_filter(window, moment, b"raw")["$and"][1]["$or"][1:] == [{"updated_at": moment}]


def test_report_round_trips_through_its_document():
    report = DriftReport(
        run_id="r1",
        window=Window(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)),
        collections=[
            CollectionProgress("contexts", scanned=10, present=7, repaired=2, failed=1, last_id=ObjectId()),
            CollectionProgress("facts", scanned=5, present=5, done=True),
        ],
        trigger="schedule",
        attempts=2,
    )
    report.collections[0].fail("e9", "bad")
    doc = report.to_doc()
    again = DriftReport.from_doc(doc)
    assert again.to_doc() == doc
    assert again.totals() == {"scanned": 15, "present": 12, "repaired": 2, "failed": 2}
    text = report.render()
    assert "total" in text
    assert "failed: contexts/e9: bad" in text
    assert report.summary()["collections"]["facts"]["present"] == 5


def test_scheduled_time_is_the_latest_fire_time():
    assert scheduled_time("0 2 * * *", datetime(2024, 5, 2, 2, 0, 0, 500000, tzinfo=UTC)) == datetime(
        2024, 5, 2, 2, 0, tzinfo=UTC
    )
    assert scheduled_time("0 2 * * *", datetime(2024, 5, 2, 1, 59, tzinfo=UTC)) == datetime(
        2024, 5, 1, 2, 0, tzinfo=UTC
    )
    assert scheduled_time("*/15 * * * *", datetime(2024, 5, 2, 10, 7, tzinfo=UTC)) == datetime(
        2024, 5, 2, 10, 0, tzinfo=UTC
    )


def test_control_messages_round_trip_and_reject_garbage():
    at = datetime(2024, 5, 2, 2, 0, tzinfo=UTC)
    request = ControlMessage(REQUEST, "reconcile", at, "w1", reason="schedule")
    assert ControlMessage.decode(request.encode()) == request
    finished = ControlMessage(FINISHED, "retention", at, "w2", attempt=2, outcome="failed", error="boom")
    assert ControlMessage.decode(finished.encode()) == finished
    assert request.key == "reconcile@2024-05-02T02:00Z"
    for garbage in (b"", b"not json", b"[]", b'{"kind": "other"}', b'{"kind": "request", "job": "x"}'):
        with pytest.raises(ValueError, match=r"not JSON|not a run request|invalid scheduled_for"):
            ControlMessage.decode(garbage)
