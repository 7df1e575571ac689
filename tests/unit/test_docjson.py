"""The one document encoder: lossless, deterministic, size-limited."""

from __future__ import annotations

import math

import pytest
from bson import Decimal128, Int64
from hypothesis import given, settings

from app import docjson
from tests import strategies


@settings(max_examples=300, deadline=None)
@given(strategies.documents(ferretdb_safe=False))
def test_round_trip_is_lossless_for_every_bson_type(document):
    normalised = docjson.normalise({"_id": "x", **document})
    encoded = docjson.encode(normalised)
    decoded = docjson.decode(encoded)
    assert docjson.encode(decoded) == encoded
    if not _has_nan(normalised):
        assert decoded == normalised
        assert _types(decoded) == _types(normalised)


def _has_nan(value: object) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def _types(value: object) -> object:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def test_int32_int64_and_double_stay_distinct():
    decoded = docjson.decode(docjson.encode(docjson.normalise({"a": 1, "b": Int64(1), "c": 1.0})))
    assert [type(decoded[k]).__name__ for k in "abc"] == ["int", "Int64", "float"]


def test_decimal128_and_negative_zero_survive():
    decoded = docjson.decode(docjson.encode(docjson.normalise({"d": Decimal128("1.10"), "z": -0.0})))
    assert decoded["d"] == Decimal128("1.10")
    assert math.copysign(1, decoded["z"]) == -1


def test_encoding_is_compact_and_stable():
    doc = docjson.normalise({"_id": "a", "n": 1, "s": "é"})
    assert docjson.encode(doc) == '{"_id":"a","n":{"$numberInt":"1"},"s":"é"}'


def test_over_the_limit_is_refused_not_truncated():
    doc = docjson.normalise({"blob": "x" * 5000})
    with pytest.raises(docjson.DocumentTooLarge, match="over the limit of 1024"):
        docjson.encode_checked(doc, 1024)
    assert len(docjson.encode_checked(doc, 10_000)) > 5000
