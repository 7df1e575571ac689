"""The data contract: `MemorySyncEvent`, mirroring schemas/memory-sync-event.avsc field for field.

tests/unit/test_records.py proves the record and the .avsc cannot drift apart.
"""

from __future__ import annotations

import enum

import faust


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
