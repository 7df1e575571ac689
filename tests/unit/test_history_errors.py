"""ERROR_CLASSES and classify(): one test per family of ClickHouse errors, with the exception objects the
driver and chdb really raise, plus the per-row checks that name rejected rows."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import orjson
import pytest
from clickhouse_driver import errors as driver_errors

from app.history import (
    ERROR_CLASSES,
    HistoryRow,
    RowsRejected,
    SinkUnavailable,
    classify,
    invalid_rows,
    parse_partition,
    quote,
    row_problem,
)


def server_error(code: int, text: str = "DB::Exception: something") -> driver_errors.ServerException:
    """What clickhouse-driver raises for an exception packet from the server."""
    return driver_errors.ServerException(f"{text}. Stack trace:\n\n0. clickhouse-server(StackTrace)", code)


def chdb_error(code: int, name: str, text: str = "DB::Exception: something") -> RuntimeError:
    """What chdb raises: a RuntimeError (ChdbError) whose text carries the engine's code."""
    return RuntimeError(f"Code: {code}. {text}. ({name}) (version 26.9.2.1)")


def raised(call: Callable[[], object]) -> BaseException:
    """The exception `call` really raises."""
    try:
        call()
    except BaseException as exc:
        return exc
    raise AssertionError("expected an exception")


def refused_connection() -> BaseException:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))


def assert_sink(exc: BaseException, code: int | None) -> None:
    result = classify(exc)
    assert isinstance(result, SinkUnavailable), result
    assert result.code == code


def assert_record(exc: BaseException, code: int | None) -> None:
    result = classify(exc)
    assert isinstance(result, RowsRejected), result
    assert result.code == code


def test_table_only_holds_the_two_classes():
    assert set(ERROR_CLASSES.values()) == {"sink", "record"}
    assert all(isinstance(code, int) and code > 0 for code in ERROR_CLASSES)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (driver_errors.NetworkError("Connection refused (127.0.0.1:9000)"), 210),
        (driver_errors.SocketTimeoutError("Code: 209. (127.0.0.1:9000)"), 209),
        (driver_errors.UnexpectedPacketFromServerError("Unexpected packet"), 102),
        (server_error(159, "Timeout exceeded: elapsed 61 seconds"), 159),
        (server_error(32, "Attempt to read after eof"), 32),
        (server_error(394, "Query was cancelled"), 394),
        (chdb_error(209, "SOCKET_TIMEOUT", "Timeout exceeded while reading from socket"), 209),
        (refused_connection(), None),
        (TimeoutError("timed out"), None),
        (EOFError("Unexpected EOF while reading bytes"), None),
    ],
)
def test_network_and_timeouts_are_sink_level(exc, code):
    assert_sink(exc, code)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (server_error(252, "Too many parts (300). Merges are processing significantly slower"), 252),
        (server_error(164, "Cannot execute query in readonly mode"), 164),
        (server_error(242, "Table is in readonly mode"), 242),
        (server_error(241, "Memory limit (for query) exceeded"), 241),
        (server_error(243, "Cannot reserve 1.00 MiB, not enough space"), 243),
        (server_error(202, "Too many simultaneous queries"), 202),
        (chdb_error(252, "TOO_MANY_PARTS", "Too many parts (3000)"), 252),
        (chdb_error(241, "MEMORY_LIMIT_EXCEEDED", "Memory limit (total) exceeded"), 241),
    ],
)
def test_overload_readonly_and_memory_are_sink_level(exc, code):
    assert_sink(exc, code)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (server_error(516, "default: Authentication failed: password is incorrect"), 516),
        (server_error(193, "Wrong password for user default"), 193),
        (server_error(192, "Unknown user memsync"), 192),
        (server_error(497, "memsync: Not enough privileges"), 497),
        (server_error(60, "Table default.operational_context_history doesn't exist"), 60),
        (server_error(81, "Database memsync doesn't exist"), 81),
        (server_error(16, "There is no column 'source' in table"), 16),
        (server_error(62, "Syntax error: failed at position 1"), 62),
        (server_error(115, "Unknown setting insert_deduplication_token"), 115),
        (chdb_error(60, "UNKNOWN_TABLE", "Unknown table expression identifier 'nope'"), 60),
    ],
)
def test_auth_schema_and_configuration_are_sink_level(exc, code):
    # An operator fixes these; the held batch then goes in unchanged, so nothing may be dropped.
    assert_sink(exc, code)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (chdb_error(691, "UNKNOWN_ELEMENT_OF_ENUM", "Unknown element 'FOO' for enum"), 691),
        (chdb_error(72, "CANNOT_PARSE_NUMBER", "Unsigned type must not contain '-' symbol"), 72),
        (chdb_error(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "Cannot parse input: expected '\"'"), 27),
        (RuntimeError("Streaming insert finish failed: Code: 117. DB::Exception: bad JSON"), 117),
        (server_error(53, "Type mismatch in IN or VALUES section"), 53),
        (server_error(6, "Cannot parse string 'x' as Int64"), 6),
        (server_error(321, "Value is out of range of data type"), 321),
        (server_error(349, "Cannot insert NULL value into a column of type 'String'"), 349),
        (driver_errors.TypeMismatchError("Type mismatch in VALUES section. Column version: ..."), 53),
        # The driver's own "Unknown element 'FOO' for type Enum8" while converting values client-side.
        (driver_errors.LogicalError("Unknown element 'FOO' for type Enum8('INSERT' = 1)"), 49),
        (raised(lambda: "\ud800".encode()), None),
        (raised(lambda: orjson.dumps(["\ud800"])), None),
    ],
)
def test_parse_and_type_errors_are_record_level(exc, code):
    assert_record(exc, code)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (server_error(4242, "Something new in a future server"), 4242),
        (chdb_error(4242, "SOMETHING_NEW"), 4242),
        # Server-side LOGICAL_ERROR is a ClickHouse bug, not a bad value (unlike the driver's LogicalError).
        (server_error(49, "Logical error: unexpected state"), 49),
        (server_error(36, "Bad arguments"), 36),
        (RuntimeError("chdb crashed without a code"), None),
        (ValueError("no idea"), None),
        (KeyError("data_type"), None),
        (driver_errors.PartiallyConsumedQueryError(), None),
    ],
)
def test_unknown_errors_hold_the_batch(exc, code):
    assert_sink(exc, code)


def test_classified_errors_pass_through_unchanged():
    sink = SinkUnavailable("down", 210)
    rejected = RowsRejected("bad", 53, rows=[2])
    assert classify(sink) is sink
    assert classify(rejected) is rejected


def test_reason_is_short_and_never_carries_a_secret():
    exc = server_error(516, "user memsync with password hunter2-secret: Authentication failed " + "x" * 2000)
    result = classify(exc, secrets=["hunter2-secret", ""])
    assert "hunter2-secret" not in str(result)
    assert "***" in result.reason
    assert "Stack trace" not in result.reason
    assert len(result.reason) < 600
    assert str(result).endswith("(ClickHouse code 516)")


# ------------------------------------------------------------------ record-level checks


def row(**changes: object) -> HistoryRow:
    values: dict[str, object] = {
        "event_id": "ev-1",
        "entity_id": "doc-1",
        "data_type": "context",
        "operation": "INSERT",
        "collection": "contexts",
        "event_ts_ms": 1_704_067_200_000,
        "version": 1,
        "data": '{"_id": "doc-1"}',
        "metadata": None,
        "source": "realtime",
    }
    values.update(changes)
    return HistoryRow(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"operation": "UPSERT"}, "operation"),
        ({"source": "kafka"}, "source"),
        ({"version": -1}, "version"),
        ({"version": 2**64}, "version"),
        ({"version": "3"}, "version"),
        ({"event_ts_ms": -1}, "event_ts_ms"),
        ({"event_ts_ms": 2**32 * 1000}, "event_ts_ms"),
        ({"event_ts_ms": 1.5}, "event_ts_ms"),
        ({"data": None}, "data"),
        ({"data": 5}, "data"),
        ({"data": "\ud800"}, "data"),
        ({"metadata": 7}, "metadata"),
        ({"entity_id": b"doc-1"}, "entity_id"),
    ],
)
def test_row_problem_names_the_field(changes, field):
    problem = row_problem(row(**changes))
    assert problem is not None
    assert problem.startswith(field)


def test_valid_rows_pass_and_invalid_rows_are_indexed():
    rows = [row(), row(metadata='{"k": 1}', data="é ü 😀"), row(operation="FOO"), row(), row(version=-5)]
    assert row_problem(rows[1]) is None
    assert sorted(invalid_rows(rows)) == [2, 4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("('context',202401)", ("context", 202401)),
        ("('it\\'s',202312)", ("it's", 202312)),
        ("('back\\\\slash',199912)", ("back\\slash", 199912)),
        ("('tab\\there',202001)", ("tab\there", 202001)),
        ("('épisode',202405)", ("épisode", 202405)),
        ("('',202405)", ("", 202405)),
        ("202401", None),
        ("('context')", None),
        ("('context',2024-01)", None),
    ],
)
def test_parse_partition(text, expected):
    assert parse_partition(text) == expected


def test_quote_escapes_what_clickhouse_unescapes():
    assert quote("a'b\\c") == "'a\\'b\\\\c'"


def test_a_failed_connect_is_one_log_line_not_a_traceback(caplog):
    from app.history import HistoryStore
    from app.settings import ClickHouseTarget

    with socket.socket() as unused:  # a loopback port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    store = HistoryStore.open(ClickHouseTarget(backend="server", host="127.0.0.1", port=port), "history")
    with caplog.at_level(logging.WARNING, logger="clickhouse_driver"), pytest.raises(SinkUnavailable):
        store.ensure_schema()
    failures = [r for r in caplog.records if r.getMessage().startswith("Failed to connect")]
    assert failures, "the driver's line is kept"
    assert all(r.exc_info is None and not r.exc_text for r in failures)
    assert "Traceback" not in caplog.text
