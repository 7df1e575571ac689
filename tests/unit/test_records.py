"""The record, the .avsc and the codecs agree; a field added on one side is caught."""

from __future__ import annotations

import copy
import json

import faust
import pytest
from faust.serializers import codecs

from app.codecs import SCHEMA_PATH, EventDecodeError, decode_avro, decode_event, encode_event
from app.records import MemorySyncEvent, contract_mismatches

SCHEMA = json.loads(SCHEMA_PATH.read_text())

EVENT = MemorySyncEvent(
    event_id="e-1",
    entity_id="ent-ü",
    data_type="context",
    operation="UPDATE",
    collection="contexts",
    timestamp=1_733_000_000_123,
    data='{"_id":"ent-ü","version":{"$numberInt":"2"}}',
    metadata='{"by":"agent-7"}',
)


def test_schema_is_the_seeds():
    assert SCHEMA["name"] == "MemorySyncEvent"
    assert SCHEMA["namespace"] == "com.neuralhive.memory"
    assert [f["name"] for f in SCHEMA["fields"]] == [
        "event_id",
        "entity_id",
        "data_type",
        "operation",
        "collection",
        "timestamp",
        "data",
        "metadata",
    ]
    operation = next(f for f in SCHEMA["fields"] if f["name"] == "operation")["type"]
    assert operation == {"type": "enum", "name": "Operation", "symbols": ["INSERT", "UPDATE", "DELETE"]}
    assert next(f for f in SCHEMA["fields"] if f["name"] == "metadata")["type"] == ["null", "string"]


def test_record_matches_schema():
    assert contract_mismatches(SCHEMA) == []


def test_field_added_to_schema_is_caught():
    schema = copy.deepcopy(SCHEMA)
    schema["fields"].append({"name": "tenant", "type": "string"})
    assert any("tenant" in problem for problem in contract_mismatches(schema))


def test_field_added_to_record_is_caught():
    class Wider(MemorySyncEvent, include_metadata=False):
        tenant: str = ""

    assert any("tenant" in problem for problem in contract_mismatches(SCHEMA, Wider))


def test_type_change_is_caught():
    schema = copy.deepcopy(SCHEMA)
    next(f for f in schema["fields"] if f["name"] == "timestamp")["type"] = "int"
    assert any("timestamp" in problem for problem in contract_mismatches(schema))


@pytest.mark.parametrize("codec", ["avro", "json"])
def test_every_field_round_trips_through_faust_codec(codec):
    payload = EVENT.dumps(serializer=f"memsync_{codec}")
    decoded = decode_event(payload, codec)
    assert decoded == EVENT.asdict()
    assert MemorySyncEvent.from_data(codecs.loads(f"memsync_{codec}", payload)) == EVENT


@pytest.mark.parametrize("codec", ["avro", "json"])
def test_null_metadata_round_trips(codec):
    event = EVENT.derive(metadata=None)
    assert decode_event(encode_event(event.asdict(), codec), codec)["metadata"] is None


def test_avro_is_compact_and_schemaless():
    payload = EVENT.dumps(serializer="memsync_avro")
    assert b"event_id" not in payload  # no field names, no embedded schema
    assert len(payload) < len(json.dumps(EVENT.asdict()))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"not avro at all, definitely not", b"\xff" * 40],
)
def test_garbage_is_a_decode_error(payload):
    with pytest.raises(EventDecodeError):
        decode_avro(payload)


def test_unknown_operation_in_json_is_rejected():
    bad = {**EVENT.asdict(), "operation": "UPSERT"}
    with pytest.raises(EventDecodeError, match="operation"):
        decode_event(json.dumps(bad).encode(), "json")


def test_missing_field_in_json_is_rejected():
    bad = {k: v for k, v in EVENT.asdict().items() if k != "entity_id"}
    with pytest.raises(EventDecodeError, match="entity_id"):
        decode_event(json.dumps(bad).encode(), "json")


def test_tombstone_is_a_decode_error():
    with pytest.raises(EventDecodeError, match="tombstone"):
        decode_event(None, "avro")


def test_record_is_a_faust_record():
    assert issubclass(MemorySyncEvent, faust.Record)
