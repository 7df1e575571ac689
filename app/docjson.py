"""The one encoder of documents into the `data` field, shared by every path (real-time, batch, replay).

Canonical MongoDB Extended JSON v2, compact. Canonical rather than relaxed because relaxed mode writes
int32, int64 and double all as plain JSON numbers, so `{"n": Int64(5)}` would come back as an int32 and
`1.0` could come back as an int: the history would not decode to the document MongoDB holds. Canonical
keeps every BSON type (`{"$numberLong": "5"}`), at the price of a more verbose string; ClickHouse
queries read values with e.g. `JSONExtractString(data, 'field', '$numberLong')`.

The document is normalised through BSON first (`bson.encode` then `bson.decode`), which is exactly
what a later `find()` returns: datetimes cut to milliseconds, `re.Pattern` as `Regex`, tuples as
lists. So the real-time row and the batch row of one document version carry byte-identical `data`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bson
from bson import json_util
from bson.codec_options import CodecOptions
from bson.json_util import CANONICAL_JSON_OPTIONS

DECODE_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=False)


class DocumentTooLarge(ValueError):
    """The encoded document exceeds MAX_DOCUMENT_BYTES; it is refused, never truncated."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"document is {size} bytes as Extended JSON, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def normalise(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document exactly as MongoDB will hand it back from a read."""
    return bson.decode(bson.encode(document), codec_options=DECODE_OPTIONS)


def encode(document: Mapping[str, Any]) -> str:
    """Canonical Extended JSON of a document as read from MongoDB (call `normalise` first otherwise)."""
    return json_util.dumps(
        document, json_options=CANONICAL_JSON_OPTIONS, separators=(",", ":"), ensure_ascii=False
    )


def encode_checked(document: Mapping[str, Any], limit: int) -> str:
    data = encode(document)
    size = len(data.encode())
    if size > limit:
        raise DocumentTooLarge(size, limit)
    return data


def decode(data: str) -> dict[str, Any]:
    return json_util.loads(data, json_options=CANONICAL_JSON_OPTIONS)
