from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from bson import ObjectId

from app.identity import entity_id_of, epoch_ms, event_id_for, now_ms_precision, operation_for


def test_event_id_is_deterministic_and_distinct():
    a = event_id_for("contexts", "e1", 3)
    assert a == event_id_for("contexts", "e1", 3)
    assert (
        len(
            {
                a,
                event_id_for("contexts", "e1", 4),
                event_id_for("episodes", "e1", 3),
                event_id_for("contexts", "e2", 3),
            }
        )
        == 4
    )


def test_event_id_separator_prevents_collisions():
    assert event_id_for("a", "b\x1fc", 1) != event_id_for("a\x1fb", "c", 1)


def test_entity_id_of_common_id_types():
    oid = ObjectId()
    assert entity_id_of(oid) == str(oid)
    assert entity_id_of("doc-1") == "doc-1"
    assert entity_id_of(7) == '{"$numberInt":"7"}'


def test_operation_for():
    assert operation_for(1) == "INSERT"
    assert operation_for(2) == "UPDATE"
    assert operation_for(9, deleted=True) == "DELETE"


def test_epoch_ms_naive_is_utc_and_exact():
    moment = datetime(2024, 2, 29, 23, 59, 59, 999_999)
    assert epoch_ms(moment) == 1709251199999
    assert epoch_ms(moment.replace(tzinfo=UTC)) == 1709251199999
    plus_two = moment.replace(tzinfo=timezone(timedelta(hours=2))) + timedelta(hours=2)
    assert epoch_ms(plus_two) == 1709251199999


def test_now_is_cut_to_milliseconds():
    assert now_ms_precision().microsecond % 1000 == 0
