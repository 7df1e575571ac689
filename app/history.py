"""The one module through which memsync touches ClickHouse: the history table, on two backends.

- **server**: a ClickHouse server over the native protocol (clickhouse-driver). The local stack runs
  Debian's 18.16, production may run anything newer; newer features are feature-detected, never
  assumed.
- **chdb**: the ClickHouse engine embedded in this process (PyPI `chdb`, 26.x), persistent at a path.

Every SQL statement here runs on both; only the way `existing_event_ids` ships its keys differs (native
external tables on a server, query parameters in chdb), because inline literals cost 4-8x more in the
SQL parser than the lookup itself. Writes and lookups are synchronous and meant for one thread
(`HistoryStore`); `AsyncHistory` runs them on a dedicated single-thread executor so that blocking calls
never run on the event loop.

Failures come out as exactly two exceptions, so callers never inspect driver errors:
- `SinkUnavailable`: ClickHouse cannot take the batch now (unreachable, timeout, too many parts,
  read-only, auth, unknown table, an error we do not know). Retry the same batch; never DLQ.
- `RowsRejected`: a value in the batch is refused. Isolate the bad rows (`RowsRejected.rows` names them
  when known) and route them away.
`ERROR_CLASSES` is the single table deciding which ClickHouse error code is which.

Differences between the backends that matter here:
- 18.16 has no `insert_deduplication_token` and no `non_replicated_deduplication_window`; the table
  gets the window and inserts carry the token only where the server lists them in system settings.
  Without them, a retry of an insert that failed sink-level checks which rows already landed.
- 18.16 waits for data blocks after an `INSERT ... VALUES (...)` sent as plain text, so inserts always
  go through the driver's data parameter (columnar).
- 18.16 has no `mutations_sync`; `delete_older_than` polls `system.mutations` on every backend.
- chdb allows one data path per process (a second path fails with code 36 until every session on the
  first one is closed); sessions on the same path may coexist. chdb's defaults include
  `async_insert=1`, which inserts here turn off so that an insert is durable when it returns and
  deduplication tokens apply.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

import orjson
from clickhouse_driver import Client
from clickhouse_driver import errors as driver_errors

from app.settings import ROOT, ClickHouseTarget

log = logging.getLogger(__name__)


class _ConnectFailureWithoutTraceback(logging.Filter):
    """clickhouse-driver logs every failed connect at WARNING with a full traceback, i.e. a screenful per
    retry during an outage. The sink already says, once, that ClickHouse is unavailable and why; the
    driver's one line per attempt is kept, its traceback dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Failed to connect"):
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("clickhouse_driver.connection").addFilter(_ConnectFailureWithoutTraceback())

SCHEMA_FILE = ROOT / "schemas" / "clickhouse" / "operational_context_history.sql"

OPERATIONS = frozenset({"INSERT", "UPDATE", "DELETE"})
SOURCES = frozenset({"realtime", "batch", "replay"})
# The columns an insert sends, in HistoryRow order; event_time and ingested_at are server DEFAULTs.
INSERT_COLUMNS = (
    "event_id",
    "entity_id",
    "data_type",
    "operation",
    "collection",
    "event_ts_ms",
    "version",
    "data",
    "metadata",
    "source",
)
TABLE_COLUMNS = frozenset({*INSERT_COLUMNS, "event_time", "ingested_at"})
# The inserted columns with the table's types, so a value is refused while parsing, as by the table.
_INSERT_STRUCTURE = (
    "event_id String, entity_id String, data_type String, "
    "operation Enum8('INSERT' = 1, 'UPDATE' = 2, 'DELETE' = 3), collection String, event_ts_ms Int64, "
    "version UInt64, data String, metadata Nullable(String), "
    "source Enum8('realtime' = 1, 'batch' = 2, 'replay' = 3)"
)

# Deduplicated blocks remembered per table (newer servers only). One insert writes one block per
# (data_type, month) partition it touches, so this covers the last few thousand inserts: far more than
# the retries of one batch.
DEDUP_WINDOW = 10_000
CONNECT_TIMEOUT_S = 5.0
SEND_RECEIVE_TIMEOUT_S = 60.0
MUTATION_TIMEOUT_S = 600.0
_UINT64_MAX = 2**64 - 1
# event_time is a DateTime (UInt32 seconds): timestamps outside it would wrap into nonsense partitions.
_EVENT_TS_MS_MAX = (2**32 - 1) * 1000 + 999
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CODE_IN_TEXT = re.compile(r"Code:\s*(\d+)")

T = TypeVar("T")


# ------------------------------------------------------------------ rows


@dataclass(slots=True)
class HistoryRow:
    """One history row as inserted; event_time and ingested_at are filled in by ClickHouse."""

    event_id: str
    entity_id: str
    data_type: str
    operation: str  # INSERT | UPDATE | DELETE
    collection: str
    event_ts_ms: int
    version: int
    data: str
    metadata: str | None
    source: str  # realtime | batch | replay


def row_problem(row: HistoryRow) -> str | None:
    """Why ClickHouse (or the driver) would refuse this row, or None. Same verdict on both backends."""
    for name in ("event_id", "entity_id", "data_type", "collection", "data"):
        problem = _string_problem(name, getattr(row, name))
        if problem:
            return problem
    if row.metadata is not None:
        problem = _string_problem("metadata", row.metadata)
        if problem:
            return problem
    if row.operation not in OPERATIONS:
        return f"operation must be one of {sorted(OPERATIONS)}, got {row.operation!r}"
    if row.source not in SOURCES:
        return f"source must be one of {sorted(SOURCES)}, got {row.source!r}"
    if type(row.event_ts_ms) is not int or not 0 <= row.event_ts_ms <= _EVENT_TS_MS_MAX:
        return f"event_ts_ms must be epoch milliseconds between 1970 and 2106, got {row.event_ts_ms!r}"
    if type(row.version) is not int or not 0 <= row.version <= _UINT64_MAX:
        return f"version must be an integer in UInt64, got {row.version!r}"
    return None


def invalid_rows(rows: Sequence[HistoryRow]) -> dict[int, str]:
    """Index → reason for every row `row_problem` refuses (per row: for isolating, not the hot path)."""
    problems = {}
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            problems[index] = problem
    return problems


def _string_problem(name: str, value: object) -> str | None:
    if type(value) is not str:
        return f"{name} must be a string, got {type(value).__name__}"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"{name} is not valid Unicode (lone surrogate)"
    return None


def _columns(rows: Sequence[HistoryRow]) -> list[list[Any]]:
    # One list comprehension per column is the fastest transpose measured: ~3 ms for 20k rows, where
    # nested getattr loops take 2x and zip(*map(attrgetter(...))) 8x.
    return [
        [r.event_id for r in rows],
        [r.entity_id for r in rows],
        [r.data_type for r in rows],
        [r.operation for r in rows],
        [r.collection for r in rows],
        [r.event_ts_ms for r in rows],
        [r.version for r in rows],
        [r.data for r in rows],
        [r.metadata for r in rows],
        [r.source for r in rows],
    ]


def _columns_look_valid(columns: list[list[Any]]) -> bool:
    """Column-wise checks at C speed; False sends the batch to the per-row check."""
    try:
        for index in (0, 1, 2, 4, 7):
            if set(map(type, columns[index])) != {str}:
                return False
        if not set(map(type, columns[8])) <= {str, type(None)}:
            return False
        if not set(columns[3]) <= OPERATIONS or not set(columns[9]) <= SOURCES:
            return False
        for index, top in ((5, _EVENT_TS_MS_MAX), (6, _UINT64_MAX)):
            if set(map(type, columns[index])) != {int}:
                return False
            if min(columns[index]) < 0 or max(columns[index]) > top:
                return False
    except TypeError:  # an unhashable value in an enum column
        return False
    return True


# ------------------------------------------------------------------ errors


class HistoryError(Exception):
    """Base of the two failures HistoryStore raises."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        return self.reason if self.code is None else f"{self.reason} (ClickHouse code {self.code})"


class SinkUnavailable(HistoryError):
    """ClickHouse cannot take the batch now. Retry the same batch with backoff; never DLQ it."""


class RowsRejected(HistoryError):
    """A value in the batch is refused. `rows`: indexes of the refused rows in the batch, when known."""

    def __init__(self, reason: str, code: int | None = None, rows: Sequence[int] = ()) -> None:
        super().__init__(reason, code)
        self.rows = tuple(rows)


SINK = "sink"
RECORD = "record"

# ClickHouse error code → class. Codes not listed are "sink": an error we do not understand must hold
# the batch (and page someone), never drop or DLQ data.
ERROR_CLASSES: dict[int, str] = {
    # --- network and timeouts: the server is gone, restarting or slow
    32: SINK,  # ATTEMPT_TO_READ_AFTER_EOF (connection closed mid-answer)
    159: SINK,  # TIMEOUT_EXCEEDED
    160: SINK,  # TOO_SLOW
    198: SINK,  # DNS_ERROR
    209: SINK,  # SOCKET_TIMEOUT
    210: SINK,  # NETWORK_ERROR
    279: SINK,  # ALL_CONNECTION_TRIES_FAILED
    394: SINK,  # QUERY_WAS_CANCELLED
    101: SINK,  # UNEXPECTED_PACKET_FROM_CLIENT
    102: SINK,  # UNEXPECTED_PACKET_FROM_SERVER
    # --- server under pressure or refusing writes for now
    164: SINK,  # READONLY
    173: SINK,  # CANNOT_ALLOCATE_MEMORY
    201: SINK,  # QUOTA_EXCEEDED
    202: SINK,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203: SINK,  # NO_FREE_CONNECTION
    236: SINK,  # ABORTED
    241: SINK,  # MEMORY_LIMIT_EXCEEDED
    242: SINK,  # TABLE_IS_READ_ONLY
    243: SINK,  # NOT_ENOUGH_SPACE
    252: SINK,  # TOO_MANY_PARTS
    225: SINK,  # NO_ZOOKEEPER
    319: SINK,  # UNKNOWN_STATUS_OF_INSERT
    425: SINK,  # SYSTEM_ERROR
    439: SINK,  # CANNOT_SCHEDULE_TASK
    999: SINK,  # KEEPER_EXCEPTION
    # --- configuration, permissions and schema: fixed by an operator, then the same batch goes in
    16: SINK,  # NO_SUCH_COLUMN_IN_TABLE
    47: SINK,  # UNKNOWN_IDENTIFIER
    60: SINK,  # UNKNOWN_TABLE
    62: SINK,  # SYNTAX_ERROR (our SQL, not the data: inserts send data out of band)
    81: SINK,  # UNKNOWN_DATABASE
    115: SINK,  # UNKNOWN_SETTING
    192: SINK,  # UNKNOWN_USER
    193: SINK,  # WRONG_PASSWORD
    194: SINK,  # REQUIRED_PASSWORD
    195: SINK,  # IP_ADDRESS_NOT_ALLOWED
    497: SINK,  # ACCESS_DENIED
    516: SINK,  # AUTHENTICATION_FAILED
    # --- a value in the batch is refused: parsing and type errors
    6: RECORD,  # CANNOT_PARSE_TEXT
    25: RECORD,  # CANNOT_PARSE_ESCAPE_SEQUENCE
    26: RECORD,  # CANNOT_PARSE_QUOTED_STRING
    27: RECORD,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38: RECORD,  # CANNOT_PARSE_DATE
    41: RECORD,  # CANNOT_PARSE_DATETIME
    53: RECORD,  # TYPE_MISMATCH (also the driver's client-side column conversion)
    69: RECORD,  # ARGUMENT_OUT_OF_BOUND
    70: RECORD,  # CANNOT_CONVERT_TYPE
    72: RECORD,  # CANNOT_PARSE_NUMBER
    117: RECORD,  # INCORRECT_DATA
    131: RECORD,  # TOO_LARGE_STRING_SIZE
    321: RECORD,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349: RECORD,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    377: RECORD,  # ILLEGAL_SYNTAX_FOR_DATA_TYPE
    469: RECORD,  # VIOLATED_CONSTRAINT
    691: RECORD,  # UNKNOWN_ELEMENT_OF_ENUM
}

# Raised by clickhouse-driver while converting Python values into columns, before any byte of the
# block is sent. The driver's LogicalError is its "unknown enum element"; a server-side LOGICAL_ERROR
# arrives as ServerException and stays "sink".
_DRIVER_CONVERSION_ERRORS = (
    driver_errors.TypeMismatchError,
    driver_errors.LogicalError,
    driver_errors.TooLargeStringSize,
    driver_errors.CannotParseUuidError,
    driver_errors.CannotParseDomainError,
)


def classify(exc: BaseException, *, secrets: Iterable[str] = ()) -> SinkUnavailable | RowsRejected:
    """Map a driver, chdb or socket exception to SinkUnavailable or RowsRejected (see ERROR_CLASSES).

    `secrets` are masked out of the reason, so a password can never reach a log through it.
    """
    if isinstance(exc, SinkUnavailable | RowsRejected):
        return exc
    reason = _scrub(_describe(exc), secrets)
    code: int | None = None
    if isinstance(exc, driver_errors.ServerException):
        code = exc.code
    elif isinstance(exc, _DRIVER_CONVERSION_ERRORS):
        return RowsRejected(reason, exc.code)
    elif isinstance(exc, driver_errors.Error):
        code = exc.code if isinstance(exc.code, int) and exc.code > 0 else None
    elif isinstance(exc, UnicodeEncodeError | orjson.JSONEncodeError):
        # A str that cannot be encoded (lone surrogate): the value, not the server, is at fault.
        return RowsRejected(reason)
    elif isinstance(exc, OSError | EOFError):
        return SinkUnavailable(reason)
    elif isinstance(exc, RuntimeError):
        # chdb raises RuntimeError (ChdbError) whose text carries the engine's "Code: NNN."
        match = _CODE_IN_TEXT.search(str(exc))
        code = int(match.group(1)) if match else None
    if code is not None and ERROR_CLASSES.get(code) == RECORD:
        return RowsRejected(reason, code)
    return SinkUnavailable(reason, code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, driver_errors.Error):
        text = exc.message or type(exc).__name__
    else:
        text = str(exc) or type(exc).__name__
    # 18.16 appends the server's stack trace; the first lines say what happened.
    text = text.split("Stack trace", 1)[0].strip()
    text = " ".join(text.split())
    if len(text) > 500:
        text = text[:500] + "…"
    return f"{type(exc).__name__}: {text}"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------ SQL helpers


def quote(value: str) -> str:
    """A ClickHouse string literal (same escaping on 18.16 and 26.x)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\0", "\\0")
    return f"'{escaped}'"


def _epoch_seconds_ceil(moment: datetime) -> int:
    """`event_time < moment` as whole seconds: for integer t, t < x ⇔ t < ceil(x). Naive means UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.ceil(moment.timestamp())


def load_schema(table_sql: str, dedup_window: int | None) -> str:
    """The CREATE TABLE statement of SCHEMA_FILE with its placeholders filled."""
    lines = [line for line in SCHEMA_FILE.read_text().splitlines() if not line.lstrip().startswith("--")]
    settings = f"SETTINGS non_replicated_deduplication_window = {int(dedup_window)}" if dedup_window else ""
    return "\n".join(lines).replace("{table}", table_sql).replace("{settings}", settings).strip()


_ESCAPES = {
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "0": "\0",
    "a": "\a",
    "v": "\v",
    "e": "\x1b",
}


def parse_partition(text: str) -> tuple[str, int] | None:
    """`('context',202401)` as system.parts shows it → ('context', 202401); None if not that shape."""
    if not text.startswith("('"):
        return None
    out = bytearray()
    i = 2
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x" and i + 3 < len(text):
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            out.extend(_ESCAPES.get(nxt, nxt).encode())
            i += 2
            continue
        if ch == "'":
            break
        out.extend(ch.encode())
        i += 1
    else:
        return None
    rest = text[i + 1 :]
    if not (rest.startswith(",") and rest.endswith(")") and rest[1:-1].isdigit()):
        return None
    try:
        return out.decode(), int(rest[1:-1])
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One (data_type, month) partition of the history table, from system.parts (active parts).

    min_time/max_time come from the parts' min/max index of event_time (recomputed by mutations on
    18.16 and 26.x alike), so no table scan is needed.
    """

    partition_id: str
    partition: str  # the partition key value as system.parts prints it, e.g. ('context',202401)
    data_type: str
    month: int  # YYYYMM
    rows: int  # may include rows that ReplacingMergeTree has not collapsed yet
    parts: int
    bytes_on_disk: int
    min_time: datetime  # UTC
    max_time: datetime  # UTC

    def expired(self, cutoff: datetime) -> bool:
        """Every row of the partition has event_time < cutoff (whole seconds, naive means UTC)."""
        return self.max_time.timestamp() < _epoch_seconds_ceil(cutoff)


@dataclass(frozen=True, slots=True)
class Features:
    """What the connected ClickHouse supports beyond 18.16."""

    dedup_token: bool  # the insert_deduplication_token setting
    dedup_window: bool  # the non_replicated_deduplication_window MergeTree setting
    partition_limit: bool  # max_partitions_per_insert_block (19.x+: 100 by default, then throws)


# ------------------------------------------------------------------ backends


class _Backend(Protocol):
    secrets: tuple[str, ...]

    def select(self, sql: str) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str) -> None: ...

    def insert(self, table_sql: str, columns: list[list[Any]], settings: dict[str, str]) -> None: ...

    def existing(self, table_sql: str, keys: Sequence[tuple[str, str]]) -> list[str]: ...

    def close(self) -> None: ...


class _ServerBackend:
    """A ClickHouse server over the native protocol. The driver reconnects on the next call after a drop."""

    def __init__(
        self, target: ClickHouseTarget, connect_timeout_s: float, send_receive_timeout_s: float
    ) -> None:
        self.secrets = (target.password.value,)
        self._client = Client(
            host=target.host,
            port=target.port,
            database=target.database,
            user=target.user,
            password=target.password.value,
            secure=target.secure,
            verify=True,
            ca_certs=target.ca_file,
            connect_timeout=connect_timeout_s,
            send_receive_timeout=send_receive_timeout_s,
            sync_request_timeout=connect_timeout_s,
            client_name="memsync",
        )

    def _run(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except BaseException:
            # A failed call can leave the connection mid-protocol; the next call starts clean.
            self._client.disconnect()
            raise

    def select(self, sql: str) -> list[tuple[Any, ...]]:
        return self._run(lambda: self._client.execute(sql))

    def execute(self, sql: str) -> None:
        self._run(lambda: self._client.execute(sql))

    def insert(self, table_sql: str, columns: list[list[Any]], settings: dict[str, str]) -> None:
        query = f"INSERT INTO {table_sql} ({', '.join(INSERT_COLUMNS)}) VALUES"
        # columnar: the driver writes each column as is (no row→column transpose in Python);
        # types_check off: values were checked by _columns_look_valid, and its per-value loop is slow.
        self._run(
            lambda: self._client.execute(query, columns, columnar=True, types_check=False, settings=settings)
        )

    def existing(self, table_sql: str, keys: Sequence[tuple[str, str]]) -> list[str]:
        # The keys travel as an external table (a native data block, built from the pairs as they are):
        # 20k keys take ~20 ms where the same query with inline literals takes ~150 ms, all of it in the
        # SQL parser. The entity_id IN prunes granules by the primary key; the pair IN keeps exact pairs.
        external = [
            {
                "name": "_memsync_keys",
                "structure": [("entity_id", "String"), ("event_id", "String")],
                "data": keys,
            }
        ]
        sql = (
            f"SELECT DISTINCT event_id FROM {table_sql} "
            "WHERE entity_id IN (SELECT entity_id FROM _memsync_keys) "
            "AND (entity_id, event_id) IN (SELECT entity_id, event_id FROM _memsync_keys)"
        )
        rows = self._run(lambda: self._client.execute(sql, external_tables=external))
        return [event for (event,) in rows]

    def close(self) -> None:
        self._client.disconnect()


class _ChdbBackend:
    """The embedded engine. Inserts write one JSONCompactColumns document (one orjson call)."""

    def __init__(self, target: ClickHouseTarget) -> None:
        from chdb import session as chdb_session  # the engine is large: load it only when used

        self.secrets = ()
        Path(target.path).mkdir(parents=True, exist_ok=True)
        self._session: Any = chdb_session.Session(target.path)
        self._lock = threading.Lock()
        try:
            # Int64/UInt64 as JSON numbers, so query() returns ints as clickhouse-driver does.
            self._session.query("SET output_format_json_quote_64bit_integers = 0")
        except BaseException:
            self._session.close()
            raise

    def _live_session(self) -> Any:
        if self._session is None:
            raise SinkUnavailable("the chdb session is closed")
        return self._session

    def select(self, sql: str) -> list[tuple[Any, ...]]:
        with self._lock:
            result = self._live_session().query(sql, "JSONCompact")
        raw = result.bytes()
        if not raw:
            return []
        doc = orjson.loads(raw)
        converters = [_json_converter(column["type"]) for column in doc["meta"]]
        if not any(converters):
            return [tuple(row) for row in doc["data"]]
        return [
            tuple(
                conv(value) if conv and value is not None else value
                for conv, value in zip(converters, row, strict=True)
            )
            for row in doc["data"]
        ]

    def execute(self, sql: str) -> None:
        with self._lock:
            self._live_session().query(sql)

    def insert(self, table_sql: str, columns: list[list[Any]], settings: dict[str, str]) -> None:
        # The batch goes through a spool file read by file(): a plain INSERT ... SELECT, ~2x faster
        # than the same JSON inline after FORMAT (the engine copies and scans a multi-MB query text).
        # Not chdb's streaming send_insert(): in chdb 4.4 it reports rows_written and commits nothing
        # when the write fails after parsing (too many parts or partitions, a constraint): silent loss.
        # async_insert is on by default in chdb: off, so the insert is written when this returns and a
        # deduplication token applies to it.
        clauses = ", ".join(["async_insert = 0", *(f"{k} = {quote(v)}" for k, v in settings.items())])
        fd, spool = tempfile.mkstemp(prefix="memsync-chdb-insert-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(columns))
            query = (
                f"INSERT INTO {table_sql} ({', '.join(INSERT_COLUMNS)}) SETTINGS {clauses} "
                f"SELECT * FROM file({quote(spool)}, 'JSONCompactColumns', {quote(_INSERT_STRUCTURE)})"
            )
            with self._lock:
                self._live_session().query(query)
        finally:
            os.unlink(spool)

    def existing(self, table_sql: str, keys: Sequence[tuple[str, str]]) -> list[str]:
        # Query parameters are parsed as data, not SQL: 20k keys take ~40 ms against ~350 ms inline.
        params = {
            "entities": "[" + ",".join(map(quote, {entity for entity, _ in keys})) + "]",
            "keys": "[" + ",".join(f"({quote(entity)},{quote(event)})" for entity, event in keys) + "]",
        }
        sql = (
            f"SELECT DISTINCT event_id FROM {table_sql} WHERE entity_id IN {{entities:Array(String)}} "
            "AND (entity_id, event_id) IN {keys:Array(Tuple(String, String))}"
        )
        with self._lock:
            result = self._live_session().query(sql, "JSONCompact", params=params)
        raw = result.bytes()
        return [event for (event,) in orjson.loads(raw)["data"]] if raw else []

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None


def _json_converter(type_name: str) -> Callable[[Any], Any] | None:
    """Turn chdb's JSON text for date types into what clickhouse-driver returns for them: aware in
    the column's time zone when it names one, naive (server time) otherwise."""
    base = type_name
    if base.startswith("Nullable(") and base.endswith(")"):
        base = base[len("Nullable(") : -1]
    if base == "Date":
        return date.fromisoformat
    if base == "DateTime" or base.startswith("DateTime("):
        zone: tzinfo | None = None
        if base.startswith("DateTime('"):
            zone = ZoneInfo(base[len("DateTime('") : -2])

        def to_datetime(text: str) -> datetime:
            moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
            return moment.replace(tzinfo=zone) if zone else moment

        return to_datetime
    return None


# ------------------------------------------------------------------ the store


class HistoryStore:
    """The history table on one backend. Synchronous; use it from one thread (or via AsyncHistory)."""

    def __init__(self, backend: _Backend, target: ClickHouseTarget, table: str) -> None:
        self._backend = backend
        self.target = target
        self.table = table
        self.database = target.database or "default"
        self.table_sql = f"`{self.database}`.`{table}`"
        self._features: Features | None = None
        self._version: str | None = None
        # Token of the last insert that failed sink-level: ClickHouse may have written all of it, part
        # of it (one block per partition) or nothing.
        self._uncertain_token: str | None = None

    @classmethod
    def open(
        cls,
        target: ClickHouseTarget,
        table: str,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        send_receive_timeout_s: float = SEND_RECEIVE_TIMEOUT_S,
    ) -> HistoryStore:
        """Prepare access to `table`. The server backend connects on first use, so this does not fail
        when the server is down; chdb opens its data directory here (SinkUnavailable if it cannot)."""
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(f"history table name must be letters, digits and underscores, got {table!r}")
        if not _IDENTIFIER.fullmatch(target.database or "default"):
            raise ValueError(
                f"database name must be letters, digits and underscores, got {target.database!r}"
            )
        backend: _Backend
        if target.backend == "server":
            backend = _ServerBackend(target, connect_timeout_s, send_receive_timeout_s)
        elif target.backend == "chdb":
            try:
                backend = _ChdbBackend(target)
            except Exception as exc:
                raise classify(exc) from exc
        else:
            raise ValueError(f"unknown ClickHouse backend {target.backend!r}")
        return cls(backend, target, table)

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HistoryStore({self.target.describe()}, table={self.table!r})"

    # -------------------------------------------------------------- plumbing

    def _fail(self, exc: BaseException) -> SinkUnavailable | RowsRejected:
        return classify(exc, secrets=self._backend.secrets)

    def _select(self, sql: str) -> list[tuple[Any, ...]]:
        try:
            return self._backend.select(sql)
        except Exception as exc:
            raise self._fail(exc) from exc

    def _execute(self, sql: str) -> None:
        try:
            self._backend.execute(sql)
        except Exception as exc:
            raise self._fail(exc) from exc

    def features(self) -> Features:
        """Detected once per store from system tables (names, not version numbers)."""
        if self._features is None:
            settings = {
                name
                for (name,) in self._select(
                    "SELECT name FROM system.settings "
                    "WHERE name IN ('insert_deduplication_token', 'max_partitions_per_insert_block')"
                )
            }
            tree = {
                name
                for (name,) in self._select(
                    "SELECT name FROM system.merge_tree_settings "
                    "WHERE name = 'non_replicated_deduplication_window'"
                )
            }
            self._features = Features(
                dedup_token="insert_deduplication_token" in settings,
                dedup_window="non_replicated_deduplication_window" in tree,
                partition_limit="max_partitions_per_insert_block" in settings,
            )
        return self._features

    # -------------------------------------------------------------- API

    def ensure_schema(self) -> None:
        """CREATE TABLE IF NOT EXISTS from SCHEMA_FILE; then check an existing table has our columns."""
        window = DEDUP_WINDOW if self.features().dedup_window else None
        self._execute(load_schema(self.table_sql, window))
        present = {
            name
            for (name,) in self._select(
                f"SELECT name FROM system.columns WHERE database = {quote(self.database)} "
                f"AND table = {quote(self.table)}"
            )
        }
        missing = TABLE_COLUMNS - present
        if missing:
            raise SinkUnavailable(
                f"table {self.database}.{self.table} exists without columns {sorted(missing)}; "
                "migrate it or point CLICKHOUSE_HISTORY_TABLE elsewhere"
            )

    def server_version(self) -> str:
        if self._version is None:
            self._version = str(self._select("SELECT version()")[0][0])
        return self._version

    def ping(self) -> None:
        """Raises SinkUnavailable unless ClickHouse answers a query now."""
        self._select("SELECT 1")

    def insert(self, rows: Sequence[HistoryRow], dedup_token: str | None = None) -> None:
        """Write `rows` in one INSERT (atomic per partition block).

        `dedup_token` makes a retry of this insert safe: servers with insert_deduplication_token drop a
        repeat within the table's deduplication window. Where the server lacks it (18.16), a retry with
        the token of an insert that failed sink-level (so may have been written) first looks the rows
        up and inserts only the missing ones. The token must be a function of the rows: the same token
        with other rows is dropped too.
        """
        if not rows:
            return
        batch = rows  # RowsRejected.rows index the caller's batch, even when a retry sends fewer
        columns = _columns(rows)
        if not _columns_look_valid(columns):
            problems = invalid_rows(rows)
            if problems:
                first = next(iter(problems.items()))
                raise RowsRejected(
                    f"{len(problems)} of {len(rows)} rows refused; row {first[0]}: {first[1]}",
                    rows=sorted(problems),
                )
        settings: dict[str, str] = {}
        if self.features().partition_limit:
            # A batch spanning over 100 (data_type, month) partitions (a replay of old events) would
            # fail with TOO_MANY_PARTS, a sink-level code, and be retried forever. 18.16 has no limit.
            settings["max_partitions_per_insert_block"] = "0"
        if dedup_token is not None:
            if self.features().dedup_token:
                settings["insert_deduplication_token"] = dedup_token
            elif dedup_token == self._uncertain_token:
                present = self.existing_event_ids([(r.entity_id, r.event_id) for r in rows])
                if present:
                    log.info(
                        "retried insert %s: %d of %d rows already written",
                        dedup_token,
                        len(present),
                        len(rows),
                    )
                    rows = [r for r in rows if r.event_id not in present]
                    if not rows:
                        self._uncertain_token = None
                        return
                    columns = _columns(rows)
        try:
            self._backend.insert(self.table_sql, columns, settings)
        except Exception as exc:
            error = self._fail(exc)
            if isinstance(error, RowsRejected) and not error.rows:
                error = RowsRejected(error.reason, error.code, rows=sorted(invalid_rows(batch)))
            if isinstance(error, SinkUnavailable):
                self._uncertain_token = dedup_token
            raise error from exc
        self._uncertain_token = None

    def existing_event_ids(self, keys: Sequence[tuple[str, str]]) -> set[str]:
        """The event_ids of `keys` ((entity_id, event_id) pairs) already in the table. One query; the
        entity_id filter uses the primary key."""
        if not keys:
            return set()
        try:
            return set(self._backend.existing(self.table_sql, keys))
        except Exception as exc:
            raise self._fail(exc) from exc

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run any statement and return its rows (for operations and tests)."""
        return self._select(sql)

    # -------------------------------------------------------------- retention

    def partitions(self) -> list[PartitionInfo]:
        """Partitions holding rows, one per (data_type, month), oldest month first."""
        # rows > 0: a delete mutation that empties a part leaves it active with 0 rows and a 1970 range.
        rows = self._select(
            "SELECT partition_id, any(partition), sum(rows), count(), sum(bytes_on_disk), "
            "toUInt32(min(min_time)), toUInt32(max(max_time)) "
            "FROM system.parts "
            f"WHERE database = {quote(self.database)} AND table = {quote(self.table)} "
            "AND active AND rows > 0 "
            "GROUP BY partition_id"
        )
        result = []
        for partition_id, partition, n_rows, parts, size, min_ts, max_ts in rows:
            parsed = parse_partition(partition)
            if parsed is None:
                log.warning("history table %s: unexpected partition %r, skipped", self.table, partition)
                continue
            data_type, month = parsed
            result.append(
                PartitionInfo(
                    partition_id=partition_id,
                    partition=partition,
                    data_type=data_type,
                    month=month,
                    rows=int(n_rows),
                    parts=int(parts),
                    bytes_on_disk=int(size),
                    min_time=datetime.fromtimestamp(int(min_ts), UTC),
                    max_time=datetime.fromtimestamp(int(max_ts), UTC),
                )
            )
        result.sort(key=lambda p: (p.month, p.data_type))
        return result

    def drop_partition(self, partition: PartitionInfo) -> None:
        """Drop one whole partition (instant: files are unlinked, no rewrite)."""
        self._execute(f"ALTER TABLE {self.table_sql} DROP PARTITION ID {quote(partition.partition_id)}")

    def count_older_than(self, data_type: str, cutoff: datetime) -> int:
        """Rows of `data_type` with event_time < cutoff (not collapsed: a duplicate counts twice)."""
        rows = self._select(
            f"SELECT count() FROM {self.table_sql} WHERE {self._older_than(data_type, cutoff)}"
        )
        return int(rows[0][0])

    def delete_older_than(
        self, data_type: str, cutoff: datetime, *, timeout_s: float = MUTATION_TIMEOUT_S
    ) -> None:
        """Delete rows of `data_type` with event_time < cutoff and wait until the mutation is done.

        ALTER ... DELETE is a mutation: 18.16 (no mutations_sync) runs it in the background, so this
        polls system.mutations. On timeout it raises SinkUnavailable; the server goes on with it.
        """
        self._execute(f"ALTER TABLE {self.table_sql} DELETE WHERE {self._older_than(data_type, cutoff)}")
        self.wait_for_mutations(timeout_s=timeout_s)

    def wait_for_mutations(self, *, timeout_s: float = MUTATION_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        pause = 0.05
        while True:
            pending = self._select(
                "SELECT count() FROM system.mutations "
                f"WHERE database = {quote(self.database)} AND table = {quote(self.table)} AND is_done = 0"
            )
            if int(pending[0][0]) == 0:
                return
            if time.monotonic() >= deadline:
                raise SinkUnavailable(
                    f"{pending[0][0]} mutation(s) on {self.database}.{self.table} still running after "
                    f"{timeout_s:.0f}s (see system.mutations)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _older_than(self, data_type: str, cutoff: datetime) -> str:
        return (
            f"data_type = {quote(data_type)} "
            f"AND event_time < toDateTime({_epoch_seconds_ceil(cutoff)}, 'UTC')"
        )

    def close(self) -> None:
        self._backend.close()


# ------------------------------------------------------------------ async wrapper


class AsyncHistory:
    """HistoryStore for the event loop: every call runs on one dedicated thread, in call order.

    A cancelled await does not cancel the call underneath (the thread finishes it, bounded by the
    store's timeouts); close() waits for it.
    """

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def open(cls, target: ClickHouseTarget, table: str) -> AsyncHistory:
        return cls(HistoryStore.open(target, table))

    async def start(self) -> None:
        self._ensure_executor()

    def _ensure_executor(self) -> ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("AsyncHistory is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memsync-history")
        return self._executor

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        executor = self._ensure_executor()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    async def ensure_schema(self) -> None:
        await self._call(self.store.ensure_schema)

    async def server_version(self) -> str:
        return await self._call(self.store.server_version)

    async def ping(self) -> None:
        await self._call(self.store.ping)

    async def insert(self, rows: Sequence[HistoryRow], dedup_token: str | None = None) -> None:
        await self._call(self.store.insert, rows, dedup_token)

    async def existing_event_ids(self, keys: Sequence[tuple[str, str]]) -> set[str]:
        return await self._call(self.store.existing_event_ids, keys)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return await self._call(self.store.query, sql)

    async def partitions(self) -> list[PartitionInfo]:
        return await self._call(self.store.partitions)

    async def drop_partition(self, partition: PartitionInfo) -> None:
        await self._call(self.store.drop_partition, partition)

    async def delete_older_than(
        self, data_type: str, cutoff: datetime, *, timeout_s: float = MUTATION_TIMEOUT_S
    ) -> None:
        await self._call(self.store.delete_older_than, data_type, cutoff, timeout_s=timeout_s)

    async def count_older_than(self, data_type: str, cutoff: datetime) -> int:
        return await self._call(self.store.count_older_than, data_type, cutoff)

    async def close(self) -> None:
        if self._closed:
            return
        executor = self._ensure_executor()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self.store.close)
        finally:
            self._closed = True
            executor.shutdown(wait=False)
