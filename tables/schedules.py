"""Scheduled runs: the control topic that carries run requests, and the table of what became of them.

The control topic has ONE partition: the worker that owns it is the one that runs jobs, and it sees
every request of the cluster in order, so deduplicating on the table is enough for "each (job, date)
runs once". The table (RocksDB, changelog-backed, so it survives restarts and moves with the partition)
maps a run key such as `reconcile@2024-05-01T02:00Z` to its `RunState`.

Messages are JSON objects, decoded here rather than by a Faust codec: a message this version does not
understand is skipped with a warning instead of crashing the agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
import orjson

from app import app, settings

REQUEST = "request"
FINISHED = "finished"
# Outcomes of an attempt, as the `finished` message reports them.
DONE = "done"
FAILED = "failed"
INTERRUPTED = "interrupted"
RUNNING = "running"

control_topic = app.topic(
    settings.control_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=1,
    internal=True,  # created by the worker at start (brokers may have auto-creation off)
)


class RunState(faust.Record, serializer="json"):
    """What the cluster knows about one scheduled run."""

    job: str
    scheduled_for: str  # ISO 8601, UTC
    status: str  # running | done | failed | interrupted
    attempts: int  # attempts started
    failures: int  # attempts that failed
    worker: str  # the worker of the latest attempt
    updated_at: float  # epoch seconds
    error: str | None = None


scheduled_runs = app.Table(
    "scheduled-runs",
    key_type=str,
    value_type=RunState,
    partitions=1,
    help="run key (job@time) -> RunState",
    # A handful of keys a day: RocksDB's per-partition defaults (GiBs of cache) are far too big.
    options={"block_cache_size": 1024 * 1024, "write_buffer_size": 1024 * 1024, "max_write_buffer_number": 2},
)


def run_key(job: str, scheduled_for: datetime) -> str:
    return f"{job}@{scheduled_for.astimezone(UTC):%Y-%m-%dT%H:%MZ}"


@dataclass(frozen=True)
class ControlMessage:
    kind: str  # request | finished
    job: str
    scheduled_for: datetime
    sender: str
    attempt: int = 0  # finished: the attempt it reports on
    outcome: str = ""  # finished: done | failed | interrupted
    error: str | None = None
    reason: str = ""  # request: why it was sent (schedule, catch-up, retry)

    @property
    def key(self) -> str:
        return run_key(self.job, self.scheduled_for)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "kind": self.kind,
                "job": self.job,
                "scheduled_for": self.scheduled_for.astimezone(UTC).isoformat(),
                "sender": self.sender,
                "attempt": self.attempt,
                "outcome": self.outcome,
                "error": self.error,
                "reason": self.reason,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | None) -> ControlMessage:
        """Raises ValueError for anything that is not a control message of this version."""
        try:
            doc: Any = orjson.loads(raw or b"")
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("kind") not in (REQUEST, FINISHED):
            raise ValueError("not a run request or report")
        try:
            scheduled_for = datetime.fromisoformat(doc["scheduled_for"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"invalid scheduled_for: {doc.get('scheduled_for')!r}") from None
        if scheduled_for.tzinfo is None:
            scheduled_for = scheduled_for.replace(tzinfo=UTC)
        job = doc.get("job")
        if not isinstance(job, str) or not job:
            raise ValueError(f"invalid job: {job!r}")
        return cls(
            kind=doc["kind"],
            job=job,
            scheduled_for=scheduled_for,
            sender=str(doc.get("sender", "")),
            attempt=int(doc.get("attempt") or 0),
            outcome=str(doc.get("outcome") or ""),
            error=doc.get("error"),
            reason=str(doc.get("reason") or ""),
        )


__all__ = ["ControlMessage", "RunState", "control_topic", "run_key", "scheduled_runs"]
