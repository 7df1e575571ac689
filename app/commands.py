"""`faust -A app <command>`: operations an operator runs on demand, next to `faust -A app worker`.

    faust -A app sync-batch [--since ISO | --hours N] [--collection C ...] [--dry-run] [--json] [--resume]
    faust -A app retention [--dry-run] [--json]
    faust -A app dlq-replay [--since ISO] [--until ISO] [--error-class C ...] [--dry-run]

Each command is one `@app.command` function here; what it does lives in its own module (app.reconcile,
app.retention), imported inside the function so that importing `app` stays light. A command needs
MongoDB and ClickHouse, not Kafka. Add a command by writing another decorated function below; the
helpers (`open_stores`, `emit`, ...) are shared. `--json` (before the command name,
`faust -A app --json sync-batch`, or after it for sync-batch and retention) prints the report as JSON.

Exit codes: 0 done, 1 the run failed (it keeps its checkpoint; `--resume` continues it), 2 usage,
3 done but some documents could not be turned into history rows (listed in the report).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
from faust.cli import AppCommand, option

from app import app, settings

if TYPE_CHECKING:
    from pymongo.asynchronous.database import AsyncDatabase

    from app.history import AsyncHistory

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DOCUMENT_FAILURES = 3


@asynccontextmanager
async def open_stores() -> AsyncIterator[tuple[AsyncDatabase, AsyncHistory]]:
    """The configured MongoDB database and history table, closed on the way out."""
    from app.history import AsyncHistory
    from app.mongo import async_client

    mongo = async_client(settings)
    history = AsyncHistory.open(settings.clickhouse, settings.history_table)
    try:
        yield mongo[settings.mongodb_database], history
    finally:
        await history.close()
        await mongo.close()


def parse_since(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.UsageError(f"--since must be an ISO 8601 date or time, got {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def check_collections(db: AsyncDatabase, names: list[str]) -> None:
    """A `--collection` that is not in the database is a usage error: most likely a typo, which would
    otherwise be reported as a clean run that scanned nothing."""
    existing = set(await db.list_collection_names())
    unknown = [name for name in names if name not in existing or name.startswith("_memsync")]
    if unknown:
        known = sorted(name for name in existing if not name.startswith(("_memsync", "system.")))
        raise click.UsageError(
            f"--collection {', '.join(map(repr, unknown))}: no such collection in database "
            f"{db.name!r} (collections: {', '.join(known) or 'none'})"
        )


def cli_errors(fun: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Usage and operational errors as click prints them (message, exit code), not as a traceback:
    the command body runs inside a mode Worker, which would log any exception as a crash."""

    @functools.wraps(fun)
    async def command(self: AppCommand, *args: Any, **kwargs: Any) -> None:
        try:
            await fun(self, *args, **kwargs)
        except click.ClickException as exc:
            exc.show(file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    return command


JSON_OPTION = option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    help="Print the report as JSON (the same as `faust -A app --json <command>`).",
)


def emit(command: AppCommand, text: str, summary: dict[str, Any], as_json: bool = False) -> None:
    if command.json or as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(text)


@app.command(
    option(
        "--since", default=None, help="Reconcile documents updated since this ISO 8601 time (UTC if naive)."
    ),
    option(
        "--hours",
        type=click.IntRange(min=1),
        default=None,
        help="Reconcile documents updated in the last N hours (default: SYNC_LOOKBACK_HOURS).",
    ),
    option(
        "--collection",
        "collections",
        multiple=True,
        help="Collection to reconcile; repeat for several (default: SYNC_COLLECTIONS).",
    ),
    option("--dry-run", is_flag=True, default=False, help="Compare and report only; write nothing."),
    JSON_OPTION,
    option(
        "--resume",
        is_flag=True,
        default=False,
        help="Continue the latest unfinished sync-batch run (same window, collections) from its checkpoint.",
    ),
)
@cli_errors
async def sync_batch(
    self: AppCommand,
    since: str | None,
    hours: int | None,
    collections: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
    resume: bool,
) -> None:
    """Reconcile ClickHouse with MongoDB now and print the drift report."""
    from tqdm import tqdm

    from app.reconcile import Reconciler, RunStore, Window, cli_run_id

    if since is not None and hours is not None:
        raise click.UsageError("give --since or --hours, not both")
    if resume and (since is not None or hours is not None or collections or dry_run):
        raise click.UsageError("--resume continues a run as it was started: no other option goes with it")
    async with open_stores() as (db, history):
        reconciler = Reconciler.from_settings(settings, db, history)
        if resume:
            previous = await RunStore(db).latest_unfinished("cli")
            if previous is None:
                raise click.ClickException("no unfinished sync-batch run to resume")
            run_id, window = previous.run_id, previous.window
            names = [p.collection for p in previous.collections]
            already = sum(p.scanned for p in previous.collections)
            click.echo(f"resuming {run_id} (attempt {previous.attempts + 1})", err=True)
        else:
            until = datetime.now(UTC)
            start = (
                parse_since(since)
                if since is not None
                else until - timedelta(hours=hours or settings.sync_lookback_hours)
            )
            try:
                window = Window(start, until)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
            run_id = cli_run_id()
            names = list(collections or settings.sync_collections)
            if collections:
                await check_collections(db, names)
            already = 0
        total = await reconciler.count(window, names)
        bar_options: dict[str, Any] = {
            "unit": "doc",
            "desc": "reconcile",
            "disable": None,
            "file": sys.stderr,
        }
        with tqdm(total=total, initial=min(already, total), **bar_options) as bar:
            try:
                report = await reconciler.run(
                    run_id,
                    window,
                    names,
                    trigger="cli",
                    dry_run=dry_run,
                    worker=settings.worker_id,
                    progress=lambda _collection, count: bar.update(count),
                )
            except Exception as exc:
                bar.close()
                click.echo(f"sync-batch {run_id} failed: {type(exc).__name__}: {exc}", err=True)
                if not dry_run:
                    click.echo(
                        "its checkpoint is kept: `faust -A app sync-batch --resume` continues it", err=True
                    )
                raise SystemExit(EXIT_FAILED) from None
    emit(self, report.render(), report.summary(), as_json)
    if report.totals()["failed"]:
        raise SystemExit(EXIT_DOCUMENT_FAILURES)


@app.command(
    option("--dry-run", is_flag=True, default=False, help="Report what would be removed; remove nothing."),
    JSON_OPTION,
)
@cli_errors
async def retention(self: AppCommand, dry_run: bool, as_json: bool) -> None:
    """Enforce the retention policies now (RETENTION_POLICIES[_FILE]) and print what was removed."""
    from app import retention_policies
    from app.retention import enforce

    async with open_stores() as (db, history):
        try:
            report = await enforce(
                retention_policies, history, db, settings.sync_collections, dry_run=dry_run
            )
        except Exception as exc:
            click.echo(f"retention failed: {type(exc).__name__}: {exc}", err=True)
            raise SystemExit(EXIT_FAILED) from None
    emit(self, report.render(), report.summary(), as_json)


@app.command(
    option(
        "--since", default=None, help="Only dead letters written at or after this ISO time (UTC if naive)."
    ),
    option("--until", default=None, help="Only dead letters written before this ISO time (UTC if naive)."),
    option(
        "--error-class",
        "error_classes",
        multiple=True,
        help="Only this error class (memsync.error_class header); repeat for several.",
    ),
    option("--dry-run", is_flag=True, default=False, help="Count what would be replayed; publish nothing."),
)
@cli_errors
async def dlq_replay(
    self: AppCommand, since: str | None, until: str | None, error_classes: tuple[str, ...], dry_run: bool
) -> None:
    """Re-publish dead letters to the sync topic (after their cause is fixed) and print a summary."""
    from tqdm import tqdm

    from app.kafka_clients import KafkaConnectError
    from app.replay import ReplayFilter, replay_dlq

    selection = ReplayFilter(
        since=parse_since(since) if since else None,
        until=parse_since(until) if until else None,
        error_classes=frozenset(error_classes),
    )
    if selection.since and selection.until and selection.since >= selection.until:
        raise click.UsageError("--since must be before --until")
    with tqdm(unit="record", desc="dlq-replay", file=sys.stderr, disable=None) as bar:
        try:
            report = await replay_dlq(
                settings,
                selection,
                dry_run=dry_run,
                on_total=lambda total: bar.reset(total=total),
                on_record=lambda: bar.update(1),
            )
        except KafkaConnectError as exc:
            raise click.ClickException(str(exc)) from None
    emit(self, report.render(), report.summary())


__all__ = ["dlq_replay", "retention", "sync_batch"]
