"""Retention: how long history (ClickHouse) and operational documents (MongoDB) are kept, per data type.

Policies come from RETENTION_POLICIES_FILE or RETENTION_POLICIES (JSON, see docs/retention.md) and are
validated when the process starts: an unknown key, a negative or non-integer number of days is an error
that names the variable and the place in the document.

Enforcement, per data type, with cutoff = now - history_days:
- a (data_type, month) partition whose newest row is older than the cutoff is dropped whole (instant,
  no rewrite);
- rows older than the cutoff in the partitions that straddle it go with one delete mutation;
- with documents_days, operational documents of that data type whose `updated_at` is older than
  now - documents_days are deleted from the configured collections.
A dry run reports the same numbers and changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from app import metrics
from app.history import AsyncHistory, PartitionInfo
from app.identity import DATA_TYPE_FIELD, UPDATED_AT_FIELD
from app.settings import Settings, SettingsError

log = logging.getLogger(__name__)

JOB = "retention"
RUNS_COLLECTION = "_memsync_runs"
POLICY_KEYS = ("history_days", "documents_days")
TOP_LEVEL_KEYS = ("default", "data_types")
# About 270 years: beyond it a cutoff is before the epoch, which no row can be.
MAX_DAYS = 100_000


class PolicyError(SettingsError):
    """The retention policies are invalid; the message names the variable and the offending key."""


@dataclass(frozen=True)
class RetentionPolicy:
    """Days to keep; None keeps forever."""

    history_days: int | None = None
    documents_days: int | None = None

    def history_cutoff(self, now: datetime) -> datetime | None:
        return None if self.history_days is None else now - timedelta(days=self.history_days)

    def documents_cutoff(self, now: datetime) -> datetime | None:
        return None if self.documents_days is None else now - timedelta(days=self.documents_days)

    def as_dict(self) -> dict[str, int | None]:
        return {"history_days": self.history_days, "documents_days": self.documents_days}


class RetentionPolicyManager:
    """The policies by data type, and the default for every data type without its own."""

    def __init__(
        self,
        default: RetentionPolicy | None = None,
        policies: Mapping[str, RetentionPolicy] | None = None,
        source: str = "(built in)",
    ) -> None:
        self.default = default or RetentionPolicy()
        self.policies = dict(policies or {})
        self.source = source

    # -------------------------------------------------------------- loading

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicyManager:
        if settings.retention_policies_file:
            name = "RETENTION_POLICIES_FILE"
            try:
                text = Path(settings.retention_policies_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise PolicyError(
                    f"{name}: cannot read {settings.retention_policies_file!r}: {exc}"
                ) from None
            return cls.parse(text, name)
        if settings.retention_policies_json:
            return cls.parse(settings.retention_policies_json, "RETENTION_POLICIES")
        return cls()

    @classmethod
    def parse(cls, text: str, setting: str) -> RetentionPolicyManager:
        """Policies from JSON text; every error names `setting` and the path of the bad value."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise PolicyError(f"{setting} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise PolicyError(f"{setting} must be a JSON object with keys {_keys(TOP_LEVEL_KEYS)}")
        _no_unknown_keys(document, TOP_LEVEL_KEYS, setting, "")
        default = _policy(document.get("default", {}), setting, "default")
        data_types = document.get("data_types", {})
        if not isinstance(data_types, dict):
            raise PolicyError(f"{setting}: data_types must be an object of data type → policy")
        policies = {}
        for data_type, policy in data_types.items():
            if not data_type.strip():
                raise PolicyError(f"{setting}: data_types has an empty data type name")
            policies[data_type] = _policy(policy, setting, f"data_types.{data_type}")
        return cls(default, policies, setting)

    # -------------------------------------------------------------- lookup

    def policy_for(self, data_type: str) -> RetentionPolicy:
        return self.policies.get(data_type, self.default)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "default": self.default.as_dict(),
            "data_types": {name: policy.as_dict() for name, policy in sorted(self.policies.items())},
        }


def _keys(keys: Sequence[str]) -> str:
    return ", ".join(keys)


def _no_unknown_keys(document: dict[str, Any], allowed: Sequence[str], setting: str, where: str) -> None:
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        place = f" {where}:" if where else ""
        raise PolicyError(
            f"{setting}:{place} unknown key {unknown[0]!r} (allowed: {_keys(allowed)})"
            + (f"; also {', '.join(map(repr, unknown[1:]))}" if len(unknown) > 1 else "")
        )


def _policy(value: object, setting: str, where: str) -> RetentionPolicy:
    if not isinstance(value, dict):
        raise PolicyError(f"{setting}: {where} must be an object with keys {_keys(POLICY_KEYS)}")
    _no_unknown_keys(value, POLICY_KEYS, setting, where)
    days: dict[str, int | None] = {}
    for key in POLICY_KEYS:
        raw = value.get(key)
        if raw is None:
            days[key] = None
            continue
        if type(raw) is not int:
            raise PolicyError(
                f"{setting}: {where}.{key} must be a whole number of days or null (keep forever), got {raw!r}"
            )
        if raw < 1:
            raise PolicyError(
                f"{setting}: {where}.{key} must be at least 1 day (null keeps forever), got {raw}"
            )
        if raw > MAX_DAYS:
            raise PolicyError(f"{setting}: {where}.{key} must be at most {MAX_DAYS} days, got {raw}")
        days[key] = raw
    return RetentionPolicy(history_days=days["history_days"], documents_days=days["documents_days"])


# ------------------------------------------------------------------ enforcement


@dataclass
class DataTypeReport:
    data_type: str
    policy: RetentionPolicy
    history_cutoff: datetime | None = None
    partitions_dropped: list[str] = field(default_factory=list)  # the partitions, e.g. ('context',202401)
    rows_dropped: int = 0  # in dropped partitions
    rows_deleted: int = 0  # by the delete mutation
    documents_cutoff: datetime | None = None
    documents_deleted: dict[str, int] = field(default_factory=dict)  # collection → count

    @property
    def rows_removed(self) -> int:
        return self.rows_dropped + self.rows_deleted

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.as_dict(),
            "history_cutoff": _iso(self.history_cutoff),
            "partitions_dropped": self.partitions_dropped,
            "rows_dropped": self.rows_dropped,
            "rows_deleted": self.rows_deleted,
            "rows_removed": self.rows_removed,
            "documents_cutoff": _iso(self.documents_cutoff),
            "documents_deleted": self.documents_deleted,
        }


@dataclass
class RetentionReport:
    now: datetime
    dry_run: bool
    data_types: dict[str, DataTypeReport] = field(default_factory=dict)
    duration_s: float = 0.0

    def totals(self) -> dict[str, int]:
        reports = self.data_types.values()
        return {
            "partitions_dropped": sum(len(r.partitions_dropped) for r in reports),
            "rows_removed": sum(r.rows_removed for r in reports),
            "documents_deleted": sum(sum(r.documents_deleted.values()) for r in reports),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "now": _iso(self.now),
            "dry_run": self.dry_run,
            "totals": self.totals(),
            "data_types": {name: r.as_dict() for name, r in sorted(self.data_types.items())},
            "duration_s": round(self.duration_s, 3),
        }

    def render(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"retention at {_iso(self.now)}{' (dry run: nothing changed)' if self.dry_run else ''}"]
        header = ("data_type", "keep_days", "partitions", "rows_dropped", "rows_deleted", "documents")
        rows: list[tuple[object, ...]] = []
        for name, r in sorted(self.data_types.items()):
            rows.append(
                (
                    name,
                    r.policy.history_days if r.policy.history_days is not None else "forever",
                    len(r.partitions_dropped),
                    r.rows_dropped,
                    r.rows_deleted,
                    sum(r.documents_deleted.values()),
                )
            )
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            out.append(
                "  ".join(
                    str(c).ljust(w) if i == 0 else str(c).rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        totals = self.totals()
        out.append(
            f"{verb}: {totals['rows_removed']} history rows "
            f"({totals['partitions_dropped']} whole partitions), {totals['documents_deleted']} documents"
        )
        return "\n".join(out)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def enforce(
    manager: RetentionPolicyManager,
    history: AsyncHistory,
    db: AsyncDatabase | None,
    collections: Sequence[str],
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Apply every policy once. `db` None skips operational documents (history only)."""
    started = time.monotonic()
    now = (now or datetime.now(UTC)).astimezone(UTC)
    report = RetentionReport(now=now, dry_run=dry_run)
    await history.ensure_schema()
    by_type: dict[str, list[PartitionInfo]] = {}
    for partition in await history.partitions():
        by_type.setdefault(partition.data_type, []).append(partition)
    for data_type in sorted(set(by_type) | set(manager.policies)):
        policy = manager.policy_for(data_type)
        item = report.data_types[data_type] = DataTypeReport(data_type, policy)
        cutoff = policy.history_cutoff(now)
        if cutoff is not None:
            item.history_cutoff = cutoff
            await _history(history, item, by_type.get(data_type, []), cutoff, dry_run)
    if db is not None:
        await _documents(manager, db, collections, report, now, dry_run)
    report.duration_s = time.monotonic() - started
    totals = report.totals()
    log.info(
        "retention%s: %d history rows (%d partitions dropped), %d documents in %.1fs",
        " (dry run)" if dry_run else "",
        totals["rows_removed"],
        totals["partitions_dropped"],
        totals["documents_deleted"],
        report.duration_s,
    )
    return report


async def _history(
    history: AsyncHistory,
    item: DataTypeReport,
    partitions: list[PartitionInfo],
    cutoff: datetime,
    dry_run: bool,
) -> None:
    expired = [p for p in partitions if p.expired(cutoff)]
    straddling = [p for p in partitions if not p.expired(cutoff) and p.min_time < cutoff]
    for partition in expired:
        if not dry_run:
            await history.drop_partition(partition)
        item.partitions_dropped.append(partition.partition)
        item.rows_dropped += partition.rows
    if straddling:
        # Counted over the whole data type: in a dry run the expired partitions are still there.
        older = await history.count_older_than(item.data_type, cutoff)
        if dry_run:
            older -= item.rows_dropped
        if older > 0:
            if not dry_run:
                await history.delete_older_than(item.data_type, cutoff)
            item.rows_deleted = older
    if not dry_run and item.rows_removed:
        metrics.retention_rows_removed.labels(item.data_type).inc(item.rows_removed)
        log.info(
            "retention %s: dropped %d partitions (%d rows), deleted %d rows older than %s",
            item.data_type,
            len(item.partitions_dropped),
            item.rows_dropped,
            item.rows_deleted,
            _iso(cutoff),
        )


async def _documents(
    manager: RetentionPolicyManager,
    db: AsyncDatabase,
    collections: Sequence[str],
    report: RetentionReport,
    now: datetime,
    dry_run: bool,
) -> None:
    """Operational documents: per data type with documents_days; the default policy covers every
    data type without a policy of its own (and documents without a data_type)."""
    selections: list[tuple[str, RetentionPolicy, dict[str, Any]]] = [
        (name, policy, {DATA_TYPE_FIELD: name}) for name, policy in manager.policies.items()
    ]
    selections.append(("(default)", manager.default, {DATA_TYPE_FIELD: {"$nin": sorted(manager.policies)}}))
    for label, policy, selector in selections:
        cutoff = policy.documents_cutoff(now)
        if cutoff is None:
            continue
        item = report.data_types.setdefault(label, DataTypeReport(label, policy))
        item.documents_cutoff = cutoff
        query = {**selector, UPDATED_AT_FIELD: {"$lt": cutoff}}
        for name in collections:
            coll = db[name]
            if dry_run:
                count = await coll.count_documents(query)
            else:
                count = (await coll.delete_many(query)).deleted_count
            if count:
                item.documents_deleted[name] = count


async def scheduled(
    settings: Settings,
    manager: RetentionPolicyManager,
    db: AsyncDatabase,
    history: AsyncHistory,
    scheduled_for: datetime,
) -> RetentionReport:
    """The run the scheduler starts: cutoffs from the scheduled time, so a late or repeated run of the
    same date removes exactly what the on-time run would have; the report is kept in `_memsync_runs`."""
    report = await enforce(manager, history, db, settings.sync_collections, now=scheduled_for)
    run_id = f"{JOB}@{scheduled_for.astimezone(UTC):%Y-%m-%dT%H:%MZ}"
    await db[RUNS_COLLECTION].update_one(
        {"_id": run_id},
        {
            "$set": {
                "job": JOB,
                "trigger": "schedule",
                "state": "done",
                "started_at": datetime.now(UTC) - timedelta(seconds=report.duration_s),
                "finished_at": datetime.now(UTC),
                "worker": settings.worker_id,
                "report": report.summary(),
            },
            "$inc": {"attempts": 1},
        },
        upsert=True,
    )
    return report
