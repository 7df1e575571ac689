"""The failure lane: delayed retries (1 s, 2 s, 4 s) on a retry topic, then the dead-letter topic.

A record-level failure never blocks its partition: the record is copied to the retry topic (same key,
so the same partition number and idempotency state) and acked; agents/retry.py re-processes it when
due. Undecodable records skip the retries. DLQ messages keep the original key and bytes; everything
memsync knows about the failure travels in headers, so the payload is untouched for a replay.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from faust.types import TopicT

from app import metrics
from app.lane import Delivery
from app.sink import Failure

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (1.0, 2.0, 4.0)

H_ERROR_CLASS = "memsync.error_class"
H_ERROR = "memsync.error"
H_ATTEMPTS = "memsync.attempts"
H_FIRST_FAILURE = "memsync.first_failure_ms"
H_LAST_FAILURE = "memsync.last_failure_ms"
H_NOT_BEFORE = "memsync.not_before_ms"
H_SOURCE_TOPIC = "memsync.source_topic"
H_SOURCE_PARTITION = "memsync.source_partition"
H_SOURCE_OFFSET = "memsync.source_offset"
H_WORKER = "memsync.worker_id"
MAX_ERROR_CHARS = 2000


def headers_of(event: Delivery) -> dict[str, bytes]:
    raw = event.message.headers or ()
    items = raw.items() if isinstance(raw, dict) else raw
    return {key: value for key, value in items}


def _text(headers: dict[str, bytes], key: str, default: str = "") -> str:
    value = headers.get(key)
    return value.decode(errors="replace") if value is not None else default


@dataclass(frozen=True)
class FailureContext:
    """Where a failing record came from and how often it has failed, carried across retries."""

    attempts: int
    first_failure_ms: int
    source_topic: str
    source_partition: int
    source_offset: int

    @classmethod
    def of(cls, event: Delivery, now_ms: int) -> FailureContext:
        headers = headers_of(event)
        if H_ATTEMPTS in headers:
            return cls(
                attempts=int(_text(headers, H_ATTEMPTS, "0")),
                first_failure_ms=int(_text(headers, H_FIRST_FAILURE, str(now_ms))),
                source_topic=_text(headers, H_SOURCE_TOPIC),
                source_partition=int(_text(headers, H_SOURCE_PARTITION, "-1")),
                source_offset=int(_text(headers, H_SOURCE_OFFSET, "-1")),
            )
        message = event.message
        return cls(0, now_ms, message.topic, message.partition, message.offset)


class DeadLetters:
    """Routes record-level failures to the retry topic or the DLQ."""

    def __init__(self, retry_topic: TopicT, dlq_topic: TopicT, worker_id: str) -> None:
        self.retry_topic = retry_topic
        self.dlq_topic = dlq_topic
        self.worker_id = worker_id

    async def route(self, failures: Sequence[Failure]) -> None:
        pending = []
        for failure in failures:
            pending.append(await self._send(failure))
        for future in pending:
            await future  # durably in Kafka before the caller acks the originals

    async def _send(self, failure: Failure) -> object:
        now_ms = int(time.time() * 1000)
        context = FailureContext.of(failure.event, now_ms)
        attempts = context.attempts + 1
        headers = {
            H_ERROR_CLASS: failure.error_class.encode(),
            H_ERROR: failure.message[:MAX_ERROR_CHARS].encode(),
            H_ATTEMPTS: str(attempts).encode(),
            H_FIRST_FAILURE: str(context.first_failure_ms).encode(),
            H_LAST_FAILURE: str(now_ms).encode(),
            H_SOURCE_TOPIC: context.source_topic.encode(),
            H_SOURCE_PARTITION: str(context.source_partition).encode(),
            H_SOURCE_OFFSET: str(context.source_offset).encode(),
            H_WORKER: self.worker_id.encode(),
        }
        message = failure.event.message
        if failure.retryable and attempts <= len(RETRY_DELAYS_S):
            delay = RETRY_DELAYS_S[attempts - 1]
            headers[H_NOT_BEFORE] = str(now_ms + int(delay * 1000)).encode()
            metrics.retries_scheduled.labels(str(attempts)).inc()
            return await self.retry_topic.send(
                key=message.key, value=message.value, partition=message.partition, headers=headers
            )
        log.warning(
            "DLQ: %s after %d attempt(s) (%s[%d]@%d): %s",
            failure.error_class,
            attempts,
            context.source_topic,
            context.source_partition,
            context.source_offset,
            failure.message[:200],
        )
        metrics.record_dead_letter(failure.error_class)
        return await self.dlq_topic.send(key=message.key, value=message.value, headers=headers)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def without_quoted_values(message: str) -> str:
    """An error message for a web view: ClickHouse and parser errors quote the value they choked on,
    which may be a piece of the payload, so quoted text is blanked."""
    return _QUOTED.sub("'…'", message)


class DlqStats:
    """Counts and latest errors of the DLQ partitions this worker reads. Never holds payloads."""

    def __init__(self, keep_latest: int = 50) -> None:
        self.keep_latest = keep_latest
        self.by_class: dict[str, int] = {}
        self.latest: list[dict[str, object]] = []

    def record(self, event: Delivery) -> None:
        headers = headers_of(event)
        error_class = _text(headers, H_ERROR_CLASS, "unknown")
        self.by_class[error_class] = self.by_class.get(error_class, 0) + 1
        self.latest.append(
            {
                "error_class": error_class,
                "error": without_quoted_values(_text(headers, H_ERROR))[:300],
                "attempts": int(_text(headers, H_ATTEMPTS, "0") or 0),
                "last_failure_ms": int(_text(headers, H_LAST_FAILURE, "0") or 0),
                "source": f"{_text(headers, H_SOURCE_TOPIC)}[{_text(headers, H_SOURCE_PARTITION)}]"
                f"@{_text(headers, H_SOURCE_OFFSET)}",
                "dlq_offset": f"{event.message.partition}@{event.message.offset}",
                "worker_id": _text(headers, H_WORKER),
            }
        )
        del self.latest[: -self.keep_latest]

    def as_dict(self) -> dict[str, object]:
        return {"total": sum(self.by_class.values()), "by_error_class": self.by_class, "latest": self.latest}


dlq_stats = DlqStats()
