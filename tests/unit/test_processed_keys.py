"""The idempotency table's keys: the fast encoding of event ids gives Faust's bytes, for every string."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from tables.processed import _key_encoder, processed_ids


def faust_key(event_id: str) -> bytes:
    return processed_ids.data._encode_key(event_id)


def test_uuid_event_ids_take_the_fast_path_with_the_same_bytes():
    event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "contexts/e1/3"))
    assert _key_encoder()(event_id) == faust_key(event_id) == f'"{event_id}"'.encode()


@given(st.text())
def test_any_event_id_encodes_as_faust_encodes_it(event_id: str):
    assert _key_encoder()(event_id) == faust_key(event_id)


@given(st.sampled_from(['a"b', "a\\b", "tab\there", "é", "\x7f", "line\nbreak", ""]))
def test_ids_json_must_escape_go_through_faust(event_id: str):
    assert _key_encoder()(event_id) == faust_key(event_id)
