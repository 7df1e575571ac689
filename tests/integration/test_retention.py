"""Retention on both ClickHouse backends (the 18.16 server and chdb) and on MongoDB: exactly the expired
rows and documents go, whole partitions are dropped, straddling ones get one delete mutation, and a dry
run changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from pymongo import MongoClient

from app.history import AsyncHistory, HistoryRow, HistoryStore
from app.identity import epoch_ms
from app.retention import RetentionPolicyManager, RetentionReport, enforce
from tests.conftest import ROOT
from tests.worker import FAUST, Scenario

pytestmark = pytest.mark.integration

NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)
POLICIES = {
    "default": {"history_days": 90},
    "data_types": {
        "context": {"history_days": 30, "documents_days": 7},
        "episode": {"history_days": 365, "documents_days": 30},
        "note": {"history_days": None},
    },
}
# (data_type, event time): five rows at each.
TIMES = [
    ("context", datetime(2024, 1, 10, tzinfo=UTC)),  # whole expired month
    ("context", datetime(2024, 3, 5, tzinfo=UTC)),  # whole expired month
    ("context", datetime(2024, 5, 10, tzinfo=UTC)),  # May straddles the cutoff (May 16): deleted
    ("context", datetime(2024, 5, 20, tzinfo=UTC)),  # ... kept
    ("context", datetime(2024, 6, 1, tzinfo=UTC)),
    ("episode", datetime(2023, 5, 1, tzinfo=UTC)),  # whole expired month
    ("episode", datetime(2023, 6, 10, tzinfo=UTC)),  # June 2023 straddles (June 16): deleted
    ("episode", datetime(2023, 6, 20, tzinfo=UTC)),
    ("episode", datetime(2024, 1, 1, tzinfo=UTC)),
    ("fact", datetime(2024, 2, 1, tzinfo=UTC)),  # default policy, 90 days: whole month
    ("fact", datetime(2024, 3, 10, tzinfo=UTC)),  # March straddles (March 17): deleted
    ("fact", datetime(2024, 3, 20, tzinfo=UTC)),
    ("fact", datetime(2024, 6, 1, tzinfo=UTC)),
    ("note", datetime(2020, 1, 1, tzinfo=UTC)),  # kept forever
]
PER_TIME = 5
DAYS = {"context": 30, "episode": 365, "fact": 90, "note": None}


@pytest.fixture
def scenario(stack, unique_name, tmp_path) -> Scenario:
    return Scenario(stack, unique_name, tmp_path)


def rows() -> list[HistoryRow]:
    out = []
    for n, (data_type, moment) in enumerate(TIMES):
        for k in range(PER_TIME):
            out.append(
                HistoryRow(
                    event_id=f"ev-{n}-{k}",
                    entity_id=f"{data_type}-{n}-{k}",
                    data_type=data_type,
                    operation="INSERT",
                    collection=f"{data_type}s",
                    event_ts_ms=epoch_ms(moment + timedelta(minutes=k)),
                    version=1,
                    data="{}",
                    metadata=None,
                    source="batch",
                )
            )
    return out


def expected(now: datetime) -> dict[str, dict[str, int]]:
    """Per data type: rows in whole expired months, rows older than the cutoff in the others, kept."""
    result = {}
    for data_type, days in DAYS.items():
        cutoff = None if days is None else now - timedelta(days=days)
        times = [moment for dt, moment in TIMES if dt == data_type]
        months: dict[tuple[int, int], list[datetime]] = {}
        for moment in times:
            months.setdefault((moment.year, moment.month), []).append(moment)
        dropped = deleted = kept = 0
        for group in months.values():
            for moment in group:
                if cutoff is None or moment >= cutoff:
                    kept += PER_TIME
                elif max(group) < cutoff:
                    dropped += PER_TIME
                else:
                    deleted += PER_TIME
        result[data_type] = {"dropped": dropped, "deleted": deleted, "kept": kept}
    return result


def counts(store: HistoryStore) -> dict[str, int]:
    return {
        dt: int(n)
        for dt, n in store.query(f"SELECT data_type, count() FROM {store.table_sql} GROUP BY data_type")
    }


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def system_table(store: HistoryStore, name: str) -> bool:
    """Whether this backend has system.<name> with the columns the checks below read."""
    try:
        store.query(f"SELECT count() FROM system.{name} WHERE database = '' AND table = ''")
    except Exception:
        return False
    return True


def active_partitions(store: HistoryStore) -> dict[str, str]:
    """partition (as system.parts prints it) -> partition_id, of the history table's active parts."""
    return dict(
        store.query(
            f"SELECT DISTINCT partition, partition_id FROM system.parts WHERE database = '{store.database}' "
            f"AND table = '{store.table}' AND active"
        )
    )


def mutated_data_types(store: HistoryStore) -> list[str]:
    """The data type each delete mutation of the history table is for (one entry per mutation)."""
    commands = [
        command
        for (command,) in store.query(
            f"SELECT command FROM system.mutations WHERE database = '{store.database}' "
            f"AND table = '{store.table}'"
        )
    ]
    found = []
    for command in commands:
        assert "DELETE" in command.upper(), command
        (data_type,) = [dt for dt in DAYS if f"'{dt}'" in command]
        found.append(data_type)
    return sorted(found)


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_retention_removes_exactly_the_expired_rows(scenario, backend, tmp_path):
    if backend == "chdb":
        scenario.extra_env["CLICKHOUSE_URL"] = f"chdb://{tmp_path / 'chdb'}"
    settings = scenario.settings(RETENTION_POLICIES=json.dumps(POLICIES))
    manager = RetentionPolicyManager.from_settings(settings)
    store = HistoryStore.open(settings.clickhouse, settings.history_table)
    mongo = MongoClient(scenario.stack.mongodb_uri, tz_aware=False)[settings.mongodb_database]
    try:
        store.ensure_schema()
        store.insert(rows())
        before = counts(store)
        assert before == {dt: PER_TIME * sum(1 for d, _ in TIMES if d == dt) for dt in DAYS}
        # Operational documents: contexts keep 7 days, episodes 30, facts (default policy) forever.
        old, recent = NOW - timedelta(days=40), NOW - timedelta(days=3)
        for collection, data_type in (("contexts", "context"), ("episodes", "episode"), ("facts", "fact")):
            mongo[collection].insert_many(
                [
                    {
                        "_id": f"{data_type}-old-{i}",
                        "data_type": data_type,
                        "updated_at": old.replace(tzinfo=None),
                    }
                    for i in range(4)
                ]
                + [
                    {
                        "_id": f"{data_type}-new-{i}",
                        "data_type": data_type,
                        "updated_at": recent.replace(tzinfo=None),
                    }
                    for i in range(2)
                ]
            )
        want = expected(NOW)

        async def apply(dry_run: bool) -> RetentionReport:
            history = AsyncHistory.open(settings.clickhouse, settings.history_table)
            from app.mongo import async_client

            client = async_client(settings)
            try:
                return await enforce(
                    manager,
                    history,
                    client[settings.mongodb_database],
                    settings.sync_collections,
                    now=NOW,
                    dry_run=dry_run,
                )
            finally:
                await history.close()
                await client.close()

        def check(report: RetentionReport) -> None:
            for data_type, numbers in want.items():
                item = report.data_types[data_type]
                assert (item.rows_dropped, item.rows_deleted) == (numbers["dropped"], numbers["deleted"]), (
                    data_type
                )
                assert len(item.partitions_dropped) == numbers["dropped"] // PER_TIME, data_type
            assert report.data_types["context"].documents_deleted == {"contexts": 4}
            assert report.data_types["episode"].documents_deleted == {"episodes": 4}
            assert "(default)" not in report.data_types  # the default policy keeps documents

        # ClickHouse's own record, not only the report's numbers (where the backend has the tables).
        has_parts, has_mutations = system_table(store, "parts"), system_table(store, "mutations")
        partitions_before = active_partitions(store) if has_parts else {}

        dry = run(apply(dry_run=True))
        check(dry)
        assert counts(store) == before
        assert mongo["contexts"].count_documents({}) == 6
        if has_parts:
            assert active_partitions(store) == partitions_before
        if has_mutations:
            assert mutated_data_types(store) == []

        report = run(apply(dry_run=False))
        check(report)
        if has_parts:
            dropped = {p for item in report.data_types.values() for p in item.partitions_dropped}
            assert len(dropped) == sum(numbers["dropped"] for numbers in want.values()) // PER_TIME
            assert dropped <= set(partitions_before)
            remaining = active_partitions(store)
            assert not {partitions_before[p] for p in dropped} & set(remaining.values())
        if has_mutations:
            # One delete mutation per data type with a partition straddling its cutoff, none for the
            # others (whole partitions dropped, or nothing expired).
            straddling = sorted(dt for dt, numbers in want.items() if numbers["deleted"])
            assert straddling == ["context", "episode", "fact"]
            assert mutated_data_types(store) == straddling
        after = counts(store)
        for data_type, numbers in want.items():
            assert after.get(data_type, 0) == numbers["kept"], data_type
            days = DAYS[data_type]
            if days is not None:
                cutoff = int((NOW - timedelta(days=days)).timestamp())
                ((older,),) = store.query(
                    f"SELECT count() FROM {store.table_sql} WHERE data_type = '{data_type}' "
                    f"AND toUnixTimestamp(event_time) < {cutoff}"
                )
                assert older == 0
        assert {d["_id"] for d in mongo["contexts"].find()} == {"context-new-0", "context-new-1"}
        assert mongo["episodes"].count_documents({}) == 2
        assert mongo["facts"].count_documents({}) == 6

        # Enforcing again removes nothing more (partition ranges left wide by the mutation included).
        assert run(apply(dry_run=False)).totals() == {
            "partitions_dropped": 0,
            "rows_removed": 0,
            "documents_deleted": 0,
        }
        assert counts(store) == after
        if has_mutations:
            assert mutated_data_types(store) == straddling  # no further mutation
    finally:
        store.close()

    if backend == "server":
        # The CLI, against today's date: every 2024 row of a data type with a policy is expired.
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLICKHOUSE_"))},
            **scenario.env(RETENTION_POLICIES=json.dumps(POLICIES)),
        }
        result = subprocess.run(
            [FAUST, "-A", "app", "--json", "retention", "--dry-run"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads(result.stdout)
        assert summary["dry_run"] is True
        assert summary["data_types"]["context"]["rows_removed"] == after["context"]
        assert summary["data_types"]["fact"]["rows_removed"] == after["fact"]
        assert summary["data_types"]["note"]["rows_removed"] == 0
        store = HistoryStore.open(settings.clickhouse, settings.history_table)
        try:
            assert counts(store) == after
        finally:
            store.close()
