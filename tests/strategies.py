"""Hypothesis strategies for MongoDB documents with every BSON type memsync must carry faithfully."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal

from bson import Binary, Decimal128, Int64, ObjectId, Regex
from hypothesis import strategies as st

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64)
# FerretDB 1.24 rejects NaN and ±Infinity and drops the sign of -0.0; MongoDB keeps all three.
FINITE_DOUBLES = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: f != 0.0 or str(f) == "0.0"
)
DATETIMES = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
)
OBJECT_IDS = st.binary(min_size=12, max_size=12).map(ObjectId)
BINARIES = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=16, max_size=16).map(lambda b: Binary(b, 4)),
    st.binary(max_size=32).map(lambda b: Binary(b, 5)),
)
REGEXES = st.builds(
    Regex,
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.sampled_from(["", "i", "im", "imsx", "s"]),
)
# Decimal128 holds 34 significant digits.
DECIMALS = st.decimals(min_value=-(10**20), max_value=10**20, places=6).map(lambda d: Decimal128(Decimal(d)))
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
# Field names: no control characters, backslash or double quote, which FerretDB 1.24's SQLite backend cannot
# store or read back ("invalid character '\x18' in string literal", "malformed JSON"); MongoDB
# accepts both.
KEYS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='.$\\"'),
    min_size=1,
    max_size=12,
)


def scalars(*, ferretdb_safe: bool) -> st.SearchStrategy[object]:
    options = [
        st.none(),
        st.booleans(),
        INT32,
        INT64,
        FINITE_DOUBLES,
        TEXT,
        DATETIMES,
        OBJECT_IDS,
        BINARIES,
        REGEXES,
    ]
    if not ferretdb_safe:
        options += [DECIMALS, st.sampled_from([float("inf"), float("-inf"), -0.0])]
    return st.one_of(*options)


def values(*, ferretdb_safe: bool) -> st.SearchStrategy[object]:
    def containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        items = children
        if ferretdb_safe:
            # FerretDB 1.24 refuses arrays directly inside arrays ("nested arrays are not supported");
            # MongoDB accepts them. An array inside a document inside an array is fine on both.
            items = children.map(lambda v: {"items": v} if isinstance(v, list) else v)
        return st.one_of(st.lists(items, max_size=5), st.dictionaries(KEYS, children, max_size=5))

    return st.recursive(scalars(ferretdb_safe=ferretdb_safe), containers, max_leaves=25)


def documents(*, ferretdb_safe: bool = True) -> st.SearchStrategy[dict[str, object]]:
    """Top-level documents (no `_id`, no memsync-managed fields); may be empty or deeply nested."""
    reserved = {"_id", "version", "updated_at", "data_type"}
    keys = KEYS.filter(lambda k: k not in reserved)
    deep = st.integers(min_value=1, max_value=40).map(_nested)
    return st.one_of(
        st.dictionaries(keys, values(ferretdb_safe=ferretdb_safe), max_size=8),
        st.builds(lambda d, n: {**d, "deep": n}, st.dictionaries(keys, TEXT, max_size=2), deep),
    )


def _nested(depth: int) -> object:
    value: object = {"leaf": "bottom"}
    for level in range(depth):
        value = {"level": level, "child": value} if level % 2 else [value]
    return value


def python_pattern_regexes() -> st.SearchStrategy[re.Pattern[str]]:
    return st.sampled_from([re.compile("^a", re.IGNORECASE), re.compile("x.y", re.DOTALL)])
