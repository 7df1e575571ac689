"""Wire formats of `MemorySyncEvent`: Avro (schemaless fastavro, the default) and JSON.

Both are registered as Faust codecs (`memsync_avro`, `memsync_json`) so producers send records with
`topic.send(value=MemorySyncEvent(...))`; the consumer decodes raw bytes itself with `decode_event`, so
a record that does not decode becomes a poison message with a reason instead of a crashed stream.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import orjson
from faust.serializers import codecs

from app.settings import ROOT

SCHEMA_PATH = ROOT / "schemas" / "memory-sync-event.avsc"
FIELDS = ("event_id", "entity_id", "data_type", "operation", "collection", "timestamp", "data", "metadata")
OPERATIONS = frozenset({"INSERT", "UPDATE", "DELETE"})


class EventDecodeError(ValueError):
    """The bytes are not a valid MemorySyncEvent in the configured codec."""


@cache
def parsed_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    return fastavro.parse_schema(json.loads(path.read_text()))


def encode_avro(event: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed_schema(), event)
    return buffer.getvalue()


def decode_avro(payload: bytes) -> dict[str, Any]:
    buffer = io.BytesIO(payload)
    try:
        event = fastavro.schemaless_reader(buffer, parsed_schema(), None)
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, UnicodeDecodeError...
        raise EventDecodeError(f"not a MemorySyncEvent in Avro: {type(exc).__name__}: {exc}") from None
    if buffer.tell() != len(payload):
        raise EventDecodeError(f"Avro record has {len(payload) - buffer.tell()} trailing bytes")
    return event  # type: ignore[return-value]


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise EventDecodeError("JSON event must be an object")
    return validate_event(event)


def validate_event(event: dict[str, Any]) -> dict[str, Any]:
    """Check a decoded event against the schema's field types (Avro decoding already guarantees it)."""
    for name in ("event_id", "entity_id", "data_type", "collection", "data"):
        if not isinstance(event.get(name), str):
            raise EventDecodeError(f"field {name!r} must be a string")
    if event.get("operation") not in OPERATIONS:
        raise EventDecodeError(f"field 'operation' must be one of {sorted(OPERATIONS)}")
    timestamp = event.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise EventDecodeError("field 'timestamp' must be an integer (epoch ms)")
    metadata = event.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        raise EventDecodeError("field 'metadata' must be a string or null")
    unknown = set(event) - set(FIELDS)
    if unknown:
        raise EventDecodeError(f"unknown fields {sorted(unknown)}")
    return event


def decode_event(payload: bytes | None, codec: str) -> dict[str, Any]:
    if payload is None:
        raise EventDecodeError("empty message (tombstone)")
    return decode_avro(payload) if codec == "avro" else decode_json(payload)


def encode_event(event: dict[str, Any], codec: str) -> bytes:
    return encode_avro(event) if codec == "avro" else orjson.dumps(event)


class AvroCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return encode_avro(obj)

    def _loads(self, s: bytes) -> Any:
        return decode_avro(s)


class JsonEventCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def _loads(self, s: bytes) -> Any:
        return decode_json(s)


def register() -> None:
    codecs.register("memsync_avro", AvroCodec())
    codecs.register("memsync_json", JsonEventCodec())


register()
