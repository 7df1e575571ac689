"""Batch reconciliation throughput next to a raw baseline, in the same run, on the same documents.

    python -m bench.batch [--docs 200000] [--batch-size 1000] [--keep]

Loads N documents into a fresh MongoDB database (MONGODB_URI), then measures, each into its own empty
history table (CLICKHOUSE_URL):

- baseline: a raw pymongo `find()` over the window, each document encoded with the same encoder
  (`app.docjson.encode`) and identity as every memsync path, bulk-inserted in SINK_BATCH_MAX_EVENTS
  rows per INSERT. Nothing else: no sort, no existence check, no checkpoint.
- reconciliation: `app.reconcile.Reconciler.run`, as the scheduler and `faust -A app sync-batch` run it
  (sorted keyset-resumable cursor, one existence query per page, checkpoints in MongoDB).

Prints docs/s for both, the ratio (target >= 0.7), this process's CPU time per phase, and a markdown
block for bench/RESULTS.md. Needs the local stack (`make bench-batch` brings it up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bson import ObjectId
from pymongo import MongoClient

from app import docjson
from app.history import AsyncHistory, HistoryRow, HistoryStore
from app.identity import entity_id_of, epoch_ms, event_id_for, operation_for
from app.mongo import async_client
from app.reconcile import Reconciler, Window, cli_run_id
from app.settings import Settings

COLLECTION = "contexts"
DATA_TYPES = ("context", "episode", "fact")
WORDS = ("memory", "agent", "context", "episode", "fact", "user", "session", "tool", "result", "plan", "goal")


@dataclass
class Measure:
    docs: int
    seconds: float
    cpu_seconds: float
    servers: dict[str, float] | None = None  # CPU seconds of each local server during the phase

    @property
    def rate(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {ram} RAM, Python {platform.python_version()}"


def server_pids() -> dict[str, int]:
    """The local stack's FerretDB and ClickHouse processes (scripts/stack pid files), when readable."""
    stack = Path(os.environ.get("MEMSYNC_STACK_DIR", Path(__file__).resolve().parent.parent / ".stack"))
    pids = {}
    for name, label in (("mongo", "ferretdb"), ("clickhouse", "clickhouse")):
        try:
            pids[label] = int((stack / name / "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return pids


def cpu_of(pid: int) -> float:
    """utime + stime of a process, seconds (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    def __init__(self) -> None:
        self.pids = server_pids()
        self.start = {label: cpu_of(pid) for label, pid in self.pids.items()}

    def used(self) -> dict[str, float]:
        return {label: cpu_of(pid) - self.start[label] for label, pid in self.pids.items()}


def describe(measure: Measure) -> str:
    servers = ", ".join(f"{k} {v:.1f}s" for k, v in (measure.servers or {}).items())
    return f"CPU: this process {measure.cpu_seconds:.1f}s" + (f", {servers}" if servers else "")


def make_doc(i: int, base: datetime, rng: random.Random) -> dict:
    """A memory document of roughly 600 bytes as Extended JSON: text, tags, numbers, nesting, dates."""
    text = " ".join(rng.choice(WORDS) for _ in range(40))
    return {
        "_id": ObjectId(),
        "user_id": f"user-{rng.randrange(1000)}",
        "text": text,
        "tags": rng.sample(WORDS, 3),
        "score": rng.random(),
        "turn": rng.randrange(10_000),
        "source": {"agent": f"agent-{rng.randrange(20)}", "tool": rng.choice(WORDS), "ok": True},
        "created_at": (base - timedelta(days=1)).replace(tzinfo=None),
        "data_type": DATA_TYPES[i % len(DATA_TYPES)],
        "version": 1 + i % 4,
        "updated_at": (base + timedelta(milliseconds=i * 7)).replace(tzinfo=None),
    }


def load(db, docs: int, base: datetime) -> None:
    rng = random.Random(7)
    started = time.perf_counter()
    chunk = 10_000
    for start in range(0, docs, chunk):
        db[COLLECTION].insert_many([make_doc(i, base, rng) for i in range(start, min(docs, start + chunk))])
    db[COLLECTION].create_index([("updated_at", 1), ("_id", 1)], name="memsync_updated_at_id")
    print(f"loaded {docs} documents in {time.perf_counter() - started:.1f}s")


def count_rows(settings: Settings, table: str) -> tuple[int, int]:
    store = HistoryStore.open(settings.clickhouse, table)
    try:
        ((count, unique),) = store.query(f"SELECT count(), uniqExact(event_id) FROM {store.table_sql}")
        return int(count), int(unique)
    finally:
        store.close()


def drop_table(settings: Settings, table: str) -> None:
    store = HistoryStore.open(settings.clickhouse, table)
    try:
        store.query(f"DROP TABLE IF EXISTS {store.table_sql}")
    finally:
        store.close()


def baseline(settings: Settings, window: Window, table: str, insert_rows: int) -> Measure:
    """Raw find() + the shared encoder + bulk inserts; synchronous, the simplest thing that works."""
    store = HistoryStore.open(settings.clickhouse, table)
    client: MongoClient = MongoClient(settings.mongodb_uri.value, tz_aware=False)
    try:
        store.ensure_schema()
        servers = ServerCpu()
        wall, cpu = time.perf_counter(), time.process_time()
        rows: list[HistoryRow] = []
        total = 0
        for doc in client[settings.mongodb_database][COLLECTION].find(window.filter()):
            entity_id = entity_id_of(doc["_id"])
            version = int(doc["version"])
            rows.append(
                HistoryRow(
                    event_id=event_id_for(COLLECTION, entity_id, version),
                    entity_id=entity_id,
                    data_type=doc["data_type"],
                    operation=operation_for(version),
                    collection=COLLECTION,
                    event_ts_ms=epoch_ms(doc["updated_at"]),
                    version=version,
                    data=docjson.encode(doc),
                    metadata=None,
                    source="batch",
                )
            )
            if len(rows) >= insert_rows:
                store.insert(rows)
                total += len(rows)
                rows = []
        if rows:
            store.insert(rows)
            total += len(rows)
        return Measure(total, time.perf_counter() - wall, time.process_time() - cpu, servers.used())
    finally:
        store.close()
        client.close()


async def reconciliation(settings: Settings, window: Window, table: str) -> Measure:
    mongo = async_client(settings)
    history = AsyncHistory.open(settings.clickhouse, table)
    try:
        reconciler = Reconciler.from_settings(settings, mongo[settings.mongodb_database], history)
        await history.ensure_schema()
        servers = ServerCpu()
        wall, cpu = time.perf_counter(), time.process_time()
        report = await reconciler.run(cli_run_id(), window, [COLLECTION])
        elapsed, used = time.perf_counter() - wall, time.process_time() - cpu
        totals = report.totals()
        assert totals["failed"] == 0, report.render()
        return Measure(totals["repaired"], elapsed, used, servers.used())
    finally:
        await history.close()
        await mongo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1000, help="BATCH_SIZE of the reconciliation")
    parser.add_argument("--keep", action="store_true", help="keep the database and tables afterwards")
    args = parser.parse_args()

    name = f"bench_batch_{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(
        {
            **os.environ,
            "MONGODB_DATABASE": f"{name}_db",
            "SYNC_COLLECTIONS": COLLECTION,
            "BATCH_SIZE": str(args.batch_size),
        }
    )
    base = datetime.now(UTC) - timedelta(days=2)
    window = Window(base - timedelta(minutes=1), datetime.now(UTC))
    client: MongoClient = MongoClient(settings.mongodb_uri.value, tz_aware=False)
    db = client[settings.mongodb_database]
    tables = (f"{name}_baseline", f"{name}_reconcile")
    try:
        load(db, args.docs, base)
        # Warm FerretDB's and the OS's caches once, so neither measured run pays for the first read.
        sum(1 for _ in db[COLLECTION].find(window.filter(), {"_id": 1}))

        raw = baseline(settings, window, tables[0], settings.sink_batch_max_events)
        rec = asyncio.run(reconciliation(settings, window, tables[1]))
        for table in tables:
            assert count_rows(settings, table) == (args.docs, args.docs), table
        ratio = rec.rate / raw.rate
        for label, measure in (("baseline (find + encode + bulk insert)", raw), ("reconciliation", rec)):
            print(
                f"{label:40s} {measure.docs} docs in {measure.seconds:.2f}s = {measure.rate:,.0f} docs/s "
                f"({describe(measure)})"
            )
        print(f"ratio {ratio:.2f} (target >= 0.7)")
        print()
        print(
            f"| {datetime.now(UTC):%Y-%m-%d} | {args.docs:,} | {args.batch_size} | "
            f"{raw.rate:,.0f} docs/s ({raw.seconds:.1f} s; {describe(raw)}) | "
            f"{rec.rate:,.0f} docs/s ({rec.seconds:.1f} s; {describe(rec)}) | {ratio:.2f} |"
        )
        print(f"machine: {machine()}; ClickHouse {settings.clickhouse.describe()}")
    finally:
        if not args.keep:
            client.drop_database(settings.mongodb_database)
            for table in tables:
                drop_table(settings, table)
        client.close()


if __name__ == "__main__":
    main()
