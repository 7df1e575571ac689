"""app.history against real ClickHouse: the stack's server (18.16, native protocol) and embedded chdb (26.x).

Every test gets its own table (dropped at the end). Nothing here stops the shared server: outages are a
closed port, a silent listener, or a TCP proxy in front of the real server that the test cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

import app.history as history_module
from app.history import (
    AsyncHistory,
    HistoryRow,
    HistoryStore,
    RowsRejected,
    SinkUnavailable,
)
from app.settings import ClickHouseTarget, Settings

pytestmark = pytest.mark.integration

JAN = datetime(2024, 1, 10, tzinfo=UTC)
FEB = datetime(2024, 2, 10, tzinfo=UTC)
MAR = datetime(2024, 3, 10, tzinfo=UTC)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def make_rows(
    n: int, *, data_type: str = "context", at: datetime = JAN, prefix: str = "ev", step_ms: int = 1000
) -> list[HistoryRow]:
    start = ms(at)
    return [
        HistoryRow(
            event_id=f"{prefix}-{data_type}-{i}",
            entity_id=f"doc-{i % 97}",
            data_type=data_type,
            operation=("INSERT", "UPDATE", "DELETE")[i % 3],
            collection=f"{data_type}s",
            event_ts_ms=start + i * step_ms,
            version=i,
            data=f'{{"_id": "doc-{i % 97}", "n": {i}, "text": "{"é" * (i % 5)}"}}',
            metadata=None if i % 2 else '{"source": "test"}',
            source="realtime",
        )
        for i in range(n)
    ]


def server_target(clickhouse_url: str, **env: str) -> ClickHouseTarget:
    return Settings.from_env({"CLICKHOUSE_URL": clickhouse_url, **env}).clickhouse


@pytest.fixture(params=["server", "chdb"])
def target(request, tmp_path) -> ClickHouseTarget:
    if request.param == "server":
        return server_target(request.getfixturevalue("stack").clickhouse_url)
    return Settings.from_env({"CLICKHOUSE_URL": f"chdb://{tmp_path / 'chdb'}"}).clickhouse


@pytest.fixture
def store(target, unique_name) -> Iterator[HistoryStore]:
    opened = HistoryStore.open(target, unique_name)
    try:
        opened.ensure_schema()
        yield opened
    finally:
        try:
            opened.query(f"DROP TABLE IF EXISTS {opened.table_sql}")
        finally:
            opened.close()


def count(store: HistoryStore, where: str = "1") -> int:
    return int(store.query(f"SELECT count() FROM {store.table_sql} WHERE {where}")[0][0])


def counts(store: HistoryStore) -> tuple[int, int]:
    """count() and uniqExact(event_id), deliberately without FINAL."""
    total, unique = store.query(f"SELECT count(), uniqExact(event_id) FROM {store.table_sql}")[0]
    return int(total), int(unique)


class CallCounter:
    """Counts calls that reach the backend (the real one: it only wraps, never answers)."""

    def __init__(self, store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        backend = store._backend
        for name in ("select", "execute", "insert", "existing"):
            original = getattr(backend, name)
            monkeypatch.setattr(backend, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return wrapped


# ------------------------------------------------------------------ schema


def test_ensure_schema_is_idempotent_and_feature_detected(store):
    store.ensure_schema()
    store.ensure_schema()
    create = store.query(f"SHOW CREATE TABLE {store.table_sql}")[0][0]
    assert "ReplacingMergeTree" in create
    assert "PARTITION BY (data_type, toYYYYMM(event_time))" in create
    assert "ORDER BY (entity_id, collection, version, event_id)" in create
    major = int(store.server_version().split(".")[0])
    features = store.features()
    if store.target.backend == "server" and store.server_version().startswith("18.16"):
        assert not features.dedup_token
        assert not features.dedup_window
        assert "non_replicated_deduplication_window" not in create
    if major >= 22:
        assert features.dedup_token
        assert "non_replicated_deduplication_window = 10000" in create
    columns = dict(store.query(f"SELECT name, type FROM system.columns WHERE table = '{store.table}'"))
    assert columns["operation"] == "Enum8('INSERT' = 1, 'UPDATE' = 2, 'DELETE' = 3)"
    assert columns["event_time"] == "DateTime('UTC')"
    assert columns["metadata"] == "Nullable(String)"


def test_table_with_other_columns_is_reported(target, unique_name):
    other = HistoryStore.open(target, unique_name)
    try:
        other.query(f"CREATE TABLE {other.table_sql} (event_id String) ENGINE = MergeTree ORDER BY event_id")
        with pytest.raises(SinkUnavailable, match="without columns"):
            other.ensure_schema()
    finally:
        other.query(f"DROP TABLE IF EXISTS {other.table_sql}")
        other.close()


# ------------------------------------------------------------------ insert and lookup


def test_insert_then_existing_event_ids_in_one_query(store, monkeypatch):
    rows = make_rows(500)
    store.insert(rows, "batch-1")
    assert counts(store) == (500, 500)
    stored = store.query(
        f"SELECT entity_id, operation, event_ts_ms, toUnixTimestamp(event_time), version, data, metadata, "
        f"source, ingested_at > toDateTime('2020-01-01 00:00:00') FROM {store.table_sql} "
        f"WHERE event_id = 'ev-context-7'"
    )
    row = rows[7]
    assert stored == [
        (
            row.entity_id,
            row.operation,
            row.event_ts_ms,
            row.event_ts_ms // 1000,
            7,
            row.data,
            None,
            "realtime",
            1,
        )
    ]

    present = [(r.entity_id, r.event_id) for r in rows[:300]]
    missing = [(f"doc-{i}", f"absent-{i}") for i in range(200)]
    # Right event id, wrong entity: the two IN lists would match it; the pair does not exist.
    crossed = [("doc-1", rows[5].event_id)]
    counter = CallCounter(store, monkeypatch)
    found = store.existing_event_ids(present + missing + crossed)
    assert found == {event for _, event in present}
    assert counter.calls == ["existing"]
    assert store.existing_event_ids([]) == set()
    assert counter.calls == ["existing"]


def test_existing_event_ids_with_quotes_and_many_keys(store):
    odd = dataclasses.replace(make_rows(1)[0], event_id="it's \\ odd", entity_id="doc 'quoted'")
    store.insert([odd, *make_rows(2000)])
    keys = [(odd.entity_id, odd.event_id)] + [(f"doc-{i % 97}", f"nope-{i}") for i in range(20000)]
    started = time.monotonic()
    assert store.existing_event_ids(keys) == {odd.event_id}
    assert time.monotonic() - started < 5


def test_count_equals_uniq_without_final_and_repeats_collapse(store):
    rows = make_rows(1000)
    store.insert(rows, "token-A")
    assert counts(store) == (1000, 1000)
    # The same batch again, as after a crash between insert and commit.
    store.insert(rows, "token-A")
    total, unique = counts(store)
    assert unique == 1000
    if store.features().dedup_token:
        assert total == 1000  # dropped at insert by the deduplication token
    else:
        assert total == 2000  # 18.16: kept until ReplacingMergeTree merges the parts
    store.query(f"OPTIMIZE TABLE {store.table_sql} FINAL")
    assert counts(store) == (1000, 1000)


def test_insert_20k_rows_is_fast(store):
    rows = make_rows(20_000, step_ms=100)
    started = time.perf_counter()
    store.insert(rows, "big")
    elapsed = time.perf_counter() - started
    logging.getLogger(__name__).warning(
        "%s: 20k rows in %.3f s (%.0f rows/s)", store.target.backend, elapsed, 20_000 / elapsed
    )
    assert counts(store) == (20_000, 20_000)
    assert elapsed < 4.0  # ~0.1 s measured on 2 cores; generous for a loaded CI box


def test_one_insert_may_span_many_partitions(store):
    """26.x refuses an insert touching more than 100 partitions by default; a replay of old events can."""
    rows = [
        dataclasses.replace(r, event_ts_ms=ms(JAN) - i * 31 * 24 * 3600 * 1000)
        for i, r in enumerate(make_rows(130))
    ]
    store.insert(rows, "wide")
    assert len(store.partitions()) == 130
    assert counts(store) == (130, 130)


# ------------------------------------------------------------------ rejected values


@pytest.mark.parametrize(
    "bad",
    [{"operation": "UPSERT"}, {"version": -1}, {"data": "lone \ud800 surrogate"}, {"event_ts_ms": "soon"}],
)
def test_rejected_value_raises_rows_rejected_naming_the_row(store, bad):
    rows = make_rows(10)
    rows[6] = dataclasses.replace(rows[6], **bad)
    with pytest.raises(RowsRejected) as caught:
        store.insert(rows)
    assert caught.value.rows == (6,)
    assert count(store) == 0
    store.insert(make_rows(3, prefix="after"))
    assert count(store) == 3


@pytest.mark.parametrize("bad", [{"operation": "UPSERT"}, {"version": -1}, {"data": "lone \ud800 surrogate"}])
def test_value_refused_by_clickhouse_itself_is_rows_rejected(store, monkeypatch, bad):
    """With memsync's own check switched off, the driver (server) or the engine (chdb) refuses the
    value; the error must still come out as RowsRejected, and the connection must stay usable."""
    monkeypatch.setattr(history_module, "_columns_look_valid", lambda columns: True)
    rows = make_rows(10)
    rows[3] = dataclasses.replace(rows[3], **bad)
    with pytest.raises(RowsRejected) as caught:
        store.insert(rows)
    assert caught.value.rows == (3,)
    assert count(store) == 0
    store.insert(make_rows(4, prefix="after"))
    assert count(store) == 4


# ------------------------------------------------------------------ retention


def test_partitions_per_data_type_and_month(store):
    odd_type = "it's é\\odd"
    store.insert(make_rows(10, data_type="context", at=JAN) + make_rows(5, data_type="episode", at=JAN))
    store.insert(make_rows(7, data_type="context", at=FEB, prefix="feb"))
    store.insert(make_rows(3, data_type=odd_type, at=MAR))
    found = {(p.data_type, p.month): p for p in store.partitions()}
    assert {key: p.rows for key, p in found.items()} == {
        ("context", 202401): 10,
        ("episode", 202401): 5,
        ("context", 202402): 7,
        (odd_type, 202403): 3,
    }
    jan = found[("context", 202401)]
    assert jan.min_time == JAN
    assert jan.max_time == JAN + timedelta(seconds=9)
    assert jan.parts >= 1
    assert jan.bytes_on_disk > 0
    assert jan.expired(JAN + timedelta(seconds=10))
    assert not jan.expired(JAN + timedelta(seconds=9))
    assert [p.month for p in store.partitions()] == sorted(p.month for p in store.partitions())


def test_drop_partition_removes_exactly_that_partition(store):
    odd_type = "it's é\\odd"
    store.insert(make_rows(10, data_type="context", at=JAN) + make_rows(5, data_type="episode", at=JAN))
    store.insert(make_rows(7, data_type="context", at=FEB, prefix="feb"))
    store.insert(make_rows(3, data_type=odd_type, at=JAN))
    by_key = {(p.data_type, p.month): p for p in store.partitions()}
    store.drop_partition(by_key[("context", 202401)])
    store.drop_partition(by_key[(odd_type, 202401)])
    assert {(p.data_type, p.month): p.rows for p in store.partitions()} == {
        ("episode", 202401): 5,
        ("context", 202402): 7,
    }
    assert count(store) == 12
    assert count(store, "data_type = 'context'") == 7


def test_delete_older_than_removes_exactly_the_expired_rows_of_one_type(store):
    # 100 context rows one per second from JAN; the same for episode.
    store.insert(make_rows(100, data_type="context") + make_rows(100, data_type="episode"))
    store.insert(make_rows(10, data_type="context", at=FEB, prefix="feb"))
    cutoff = JAN + timedelta(seconds=40, milliseconds=500)  # rows at 0..40 s expire, 41.. s stay
    assert store.count_older_than("context", cutoff) == 41
    assert store.count_older_than("episode", cutoff) == 41
    store.delete_older_than("context", cutoff)
    assert store.count_older_than("context", cutoff) == 0
    assert count(store, "data_type = 'context'") == 59 + 10
    assert store.query(f"SELECT min(event_ts_ms) FROM {store.table_sql} WHERE data_type = 'context'")[0][
        0
    ] == ms(JAN + timedelta(seconds=41))
    assert count(store, "data_type = 'episode'") == 100
    # A naive cutoff means UTC; a cutoff on a whole second keeps the row at that second.
    store.delete_older_than("episode", datetime(2024, 1, 10, 0, 0, 10))
    assert count(store, "data_type = 'episode'") == 90
    # Mutations keep partitions() exact: the range shrinks, an emptied partition disappears.
    by_key = {(p.data_type, p.month): p for p in store.partitions()}
    assert by_key[("context", 202401)].min_time == JAN + timedelta(seconds=41)
    assert by_key[("episode", 202401)].rows == 90
    store.delete_older_than("episode", FEB)
    assert ("episode", 202401) not in {(p.data_type, p.month) for p in store.partitions()}
    pending = store.query(
        f"SELECT count() FROM system.mutations WHERE table = '{store.table}' AND is_done = 0"
    )
    assert pending == [(0,)]


# ------------------------------------------------------------------ outages (server)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_raises_sink_unavailable(stack, unique_name):
    target = server_target(f"clickhouse://default@127.0.0.1:{closed_port()}/default")
    unreachable = HistoryStore.open(target, unique_name)  # does not connect yet: no error
    try:
        for call in (
            unreachable.ping,
            unreachable.ensure_schema,
            lambda: unreachable.insert(make_rows(3)),
            lambda: unreachable.existing_event_ids([("doc-1", "ev-1")]),
        ):
            started = time.monotonic()
            with pytest.raises(SinkUnavailable) as caught:
                call()
            assert caught.value.code == 210
            assert time.monotonic() - started < 5
    finally:
        unreachable.close()


def test_hung_server_times_out_as_sink_unavailable(stack, unique_name):
    """A server that accepts connections and never answers: the timeouts turn it into SinkUnavailable."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = server_target(f"clickhouse://default@127.0.0.1:{silent.getsockname()[1]}/default")
        hung = HistoryStore.open(target, unique_name, connect_timeout_s=1, send_receive_timeout_s=1)
        try:
            started = time.monotonic()
            with pytest.raises(SinkUnavailable) as caught:
                hung.insert(make_rows(3))
            assert time.monotonic() - started < 10
            assert caught.value.code in {209, 210}
        finally:
            hung.close()


def test_wrong_password_is_sink_unavailable_and_never_shown(stack, unique_name, caplog):
    secret = "s3cr3t-do-not-print"
    target = server_target(stack.clickhouse_url, CLICKHOUSE_PASSWORD=secret)
    assert secret not in repr(target)
    assert secret not in target.describe()
    locked = HistoryStore.open(target, unique_name)
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(SinkUnavailable) as caught:
            locked.ping()
    finally:
        locked.close()
    assert caught.value.code in {192, 193, 194, 516}
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert secret not in caplog.text
    assert secret not in repr(locked)


class Proxy:
    """A TCP relay in front of the real server; stop() cuts every connection like a server restart."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = closed_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        # When set: once this many more bytes went client → server, replies are swallowed (an insert
        # reaches the server, its acknowledgement never reaches the client).
        self._swallow_after: int | None = None

    def swallow_replies_after(self, client_bytes: int | None) -> None:
        self._swallow_after = client_bytes

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        if self._listener is not None:
            # close() alone leaves a listener blocked in accept() listening on Linux; shutdown wakes it.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client and self._swallow_after is not None:
                    self._swallow_after -= len(chunk)
                if not from_client and self._swallow_after is not None and self._swallow_after <= 0:
                    continue
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_reconnects_after_the_connection_drops(stack, unique_name):
    real = server_target(stack.clickhouse_url)
    proxy = Proxy(real.port)
    proxy.start()
    via_proxy = HistoryStore.open(dataclasses.replace(real, port=proxy.port), unique_name)
    try:
        via_proxy.ensure_schema()
        via_proxy.insert(make_rows(10, prefix="before"))

        proxy.stop()  # the server "restarts": connections cut, port closed
        with pytest.raises(SinkUnavailable):
            via_proxy.insert(make_rows(10, prefix="during"))
        with pytest.raises(SinkUnavailable):
            via_proxy.ping()

        proxy.start()  # back: the same store works again, no reopen
        via_proxy.insert(make_rows(10, prefix="after"))
        assert via_proxy.existing_event_ids([("doc-1", "after-context-1")]) == {"after-context-1"}
        assert count(via_proxy) == 20

        # A connection that dies while idle (no error seen yet) is replaced on the next call too.
        proxy.stop()
        proxy.start()
        assert count(via_proxy) == 20
    finally:
        try:
            via_proxy.query(f"DROP TABLE IF EXISTS {via_proxy.table_sql}")
        finally:
            via_proxy.close()
            proxy.stop()


def test_retry_after_an_unacknowledged_insert_writes_each_row_once(stack, unique_name):
    """The server writes the insert but the client never hears back (connection lost mid-insert).
    Retrying with the same token must not duplicate rows, on servers with and without
    insert_deduplication_token: count() == uniqExact(event_id) without FINAL."""
    real = server_target(stack.clickhouse_url)
    proxy = Proxy(real.port)
    proxy.start()
    target = dataclasses.replace(real, port=proxy.port)
    flaky = HistoryStore.open(target, unique_name, connect_timeout_s=2, send_receive_timeout_s=2)
    try:
        flaky.ensure_schema()
        first = make_rows(200, prefix="first")
        flaky.insert(first, "token-1")
        # Months JAN and FEB: the insert writes two partition blocks.
        batch = make_rows(1500, prefix="lost") + make_rows(500, prefix="lost", at=FEB, data_type="episode")
        proxy.swallow_replies_after(50_000)  # the data block is far larger than 50 kB
        with pytest.raises(SinkUnavailable):
            flaky.insert(batch, "token-2")
        proxy.swallow_replies_after(None)
        deadline = time.monotonic() + 10
        while count(flaky) < 2200 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server finishes the insert it received
        assert count(flaky) == 2200

        flaky.insert(batch, "token-2")  # the caller's retry of the same batch
        assert counts(flaky) == (2200, 2200)
        flaky.insert(make_rows(10, prefix="next"), "token-3")
        assert counts(flaky) == (2210, 2210)
    finally:
        try:
            flaky.query(f"DROP TABLE IF EXISTS {flaky.table_sql}")
        finally:
            flaky.close()
            proxy.stop()


# ------------------------------------------------------------------ chdb specifics and async


def test_chdb_allows_one_data_path_per_process(tmp_path, unique_name):
    first = HistoryStore.open(ClickHouseTarget(backend="chdb", path=str(tmp_path / "a")), unique_name)
    try:
        with pytest.raises(SinkUnavailable, match="already initialized"):
            HistoryStore.open(ClickHouseTarget(backend="chdb", path=str(tmp_path / "b")), unique_name)
        same = HistoryStore.open(ClickHouseTarget(backend="chdb", path=str(tmp_path / "a")), unique_name)
        same.ensure_schema()
        same.insert(make_rows(5))
        same.close()
        assert count(first) == 5  # closing one session leaves the other working
    finally:
        first.close()
    with pytest.raises(SinkUnavailable):
        first.ping()
    # Once every session on the first path is closed, another path opens.
    HistoryStore.open(ClickHouseTarget(backend="chdb", path=str(tmp_path / "b")), unique_name).close()


def test_chdb_write_failure_after_parsing_is_raised_not_lost(tmp_path, unique_name):
    """Too many parts is refused by the table after the batch parsed; it must come out as
    SinkUnavailable with nothing written (chdb 4.4's streaming insert API reports success instead)."""
    with HistoryStore.open(ClickHouseTarget(backend="chdb", path=str(tmp_path / "parts")), unique_name) as st:
        st.ensure_schema()
        st.query(f"SYSTEM STOP MERGES {st.table_sql}")
        st.query(
            f"ALTER TABLE {st.table_sql} MODIFY SETTING parts_to_throw_insert = 2, parts_to_delay_insert = 1"
        )
        st.insert(make_rows(5, prefix="one"))
        st.insert(make_rows(5, prefix="two"))
        with pytest.raises(SinkUnavailable) as caught:
            st.insert(make_rows(5, prefix="three"))
        assert caught.value.code == 252
        assert counts(st) == (10, 10)


def test_chdb_data_persists_across_reopen(tmp_path, unique_name):
    target = ClickHouseTarget(backend="chdb", path=str(tmp_path / "persist"))
    with HistoryStore.open(target, unique_name) as first:
        first.ensure_schema()
        first.insert(make_rows(25))
    with HistoryStore.open(target, unique_name) as again:
        again.ensure_schema()
        assert counts(again) == (25, 25)


async def test_async_history_runs_calls_on_its_own_thread(store):
    history = AsyncHistory.open(store.target, store.table)  # its own store: close() closes it
    await history.start()
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    original = history.store.insert

    def insert(rows, token=None):
        seen.append(threading.current_thread())
        original(rows, token)

    history.store.insert = insert  # type: ignore[method-assign]
    rows = make_rows(50)
    await history.insert(rows, "async-token")
    assert seen
    assert seen[0] is not loop_thread
    assert seen[0].name.startswith("memsync-history")
    assert await history.existing_event_ids([(r.entity_id, r.event_id) for r in rows[:5]]) == {
        r.event_id for r in rows[:5]
    }
    assert await history.count_older_than("context", FEB) == 50
    assert (await history.query(f"SELECT count() FROM {store.table_sql}"))[0][0] == 50
    assert [(p.data_type, p.month) for p in await history.partitions()] == [("context", 202401)]
    assert (await history.server_version())[0].isdigit()
    await history.ping()
    # Calls from many tasks at once are serialized on the one thread.
    await asyncio.gather(*(history.insert(make_rows(5, prefix=f"t{i}")) for i in range(5)))
    assert await history.count_older_than("context", FEB) == 75
    with pytest.raises(RowsRejected):
        await history.insert([dataclasses.replace(rows[0], operation="NOPE")])
    await history.delete_older_than("context", FEB)
    assert await history.count_older_than("context", FEB) == 0
    await history.close()
    with pytest.raises(RuntimeError):
        await history.ping()
