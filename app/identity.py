"""Identity of a document version, the same on every path.

`event_id` is a UUIDv5 of (collection, entity_id, version): the real-time producer and the batch
reconciliation compute it independently and agree, so a version already written is never written twice.
"""

from __future__ import annotations

import calendar
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId, json_util
from bson.json_util import CANONICAL_JSON_OPTIONS

EVENT_NAMESPACE = uuid.UUID("6f1c1b1e-5a37-4d0e-9a65-0d6f3c1e7a10")

# Fields memsync keeps on every operational document it writes.
VERSION_FIELD = "version"
UPDATED_AT_FIELD = "updated_at"
DATA_TYPE_FIELD = "data_type"
MANAGED_FIELDS = frozenset({VERSION_FIELD, UPDATED_AT_FIELD, DATA_TYPE_FIELD})


def entity_id_of(document_id: Any) -> str:
    """A string for a MongoDB `_id`: strings as they are, ObjectIds as hex, anything else canonical JSON."""
    if isinstance(document_id, str):
        return document_id
    if isinstance(document_id, ObjectId):
        return str(document_id)
    return json_util.dumps(document_id, json_options=CANONICAL_JSON_OPTIONS, separators=(",", ":"))


def event_id_for(collection: str, entity_id: str, version: int) -> str:
    # A JSON array is unambiguous whatever characters the names contain.
    name = json.dumps([collection, entity_id, version], ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(EVENT_NAMESPACE, name))


def operation_for(version: int, deleted: bool = False) -> str:
    if deleted:
        return "DELETE"
    return "INSERT" if version == 1 else "UPDATE"


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch; naive datetimes (as pymongo returns them) are UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return calendar.timegm(moment.timetuple()) * 1000 + moment.microsecond // 1000


def now_ms_precision() -> datetime:
    """Now in UTC cut to milliseconds, the precision BSON stores."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
