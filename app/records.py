"""The data contract: `MemorySyncEvent`, mirroring schemas/memory-sync-event.avsc field for field.

tests/unit/test_records.py proves the record and the .avsc cannot drift apart.
"""

from __future__ import annotations

import enum

import faust

import app.codecs  # noqa: F401  (registers the memsync_avro and memsync_json codecs)


class Operation(enum.StrEnum):
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


class MemorySyncEvent(faust.Record, include_metadata=False, serializer="memsync_avro"):
    """One change of one operational document, as published to `memory.sync.events`.

    `timestamp` is epoch milliseconds of the change; `data` is the document as MongoDB Extended JSON
    (app.docjson); `metadata` is optional JSON.
    """

    event_id: str
    entity_id: str
    data_type: str
    operation: str
    collection: str
    timestamp: int
    data: str
    metadata: str | None = None


_AVRO_TYPES = {str: "string", int: "long"}


def _avro_type_of(annotation: object) -> object:
    if annotation in _AVRO_TYPES:
        return _AVRO_TYPES[annotation]  # type: ignore[index]
    if annotation == str | None:
        return ["null", "string"]
    return repr(annotation)


def contract_mismatches(schema: dict[str, object], record: type[faust.Record] = MemorySyncEvent) -> list[str]:
    """Differences between the Avro schema and the record class; empty when they agree field for field."""
    problems: list[str] = []
    fields = schema.get("fields", [])
    assert isinstance(fields, list)
    schema_fields = {f["name"]: f["type"] for f in fields}
    record_fields = dict(record._options.fields)  # name -> annotation, in declaration order
    if list(schema_fields) != list(record_fields):
        problems.append(
            f"field names/order differ: avsc {list(schema_fields)} vs record {list(record_fields)}"
        )
    for name, avro_type in schema_fields.items():
        if name not in record_fields:
            continue
        if isinstance(avro_type, dict) and avro_type.get("type") == "enum":
            if list(avro_type["symbols"]) != [op.value for op in Operation]:
                problems.append(f"{name}: enum symbols {avro_type['symbols']} vs Operation {list(Operation)}")
            expected: object = "string"
        else:
            expected = avro_type
        actual = _avro_type_of(record_fields[name])
        if actual != expected:
            problems.append(f"{name}: avsc type {avro_type!r} vs record type {actual!r}")
    return problems
