"""DLQ replay: re-publish dead letters to the sync topic once their cause is fixed.

The DLQ is read without a consumer group (nothing is committed, the worker's DLQ agent is not
disturbed) from the first offset that can match up to the end offsets taken at the start, so a replay
that re-fails and lands in the DLQ again is not replayed twice in one run. Each matching record is
sent with its original key and bytes, so it lands on the same partition as the original, and with a
`memsync.replay` header (rows get source='replay') and none of the failure headers, so it gets a fresh
set of retries. Replaying twice writes nothing twice: the sink skips event ids already written.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from app.deadletter import H_ERROR_CLASS
from app.identity import epoch_ms
from app.kafka_clients import kafka_client_kwargs, start_client, topic_partitions
from app.settings import Settings
from app.sink import REPLAY_HEADER

H_REPLAYED_FROM = "memsync.replayed_from"


@dataclass(frozen=True)
class ReplayFilter:
    since: datetime | None = None
    until: datetime | None = None
    error_classes: frozenset[str] = frozenset()

    def matches(self, record: ConsumerRecord) -> bool:
        if self.since is not None and record.timestamp < epoch_ms(self.since):
            return False
        if self.until is not None and record.timestamp >= epoch_ms(self.until):
            return False
        return not self.error_classes or error_class_of(record) in self.error_classes


@dataclass
class ReplayReport:
    dry_run: bool
    scanned: int = 0
    matched: int = 0
    replayed: int = 0
    by_error_class: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "matched": self.matched,
            "replayed": self.replayed,
            "by_error_class": dict(self.by_error_class),
        }

    def render(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        lines = [
            f"DLQ records scanned: {self.scanned}, matching: {self.matched}, {verb}: "
            f"{self.matched if self.dry_run else self.replayed}"
        ]
        lines += [f"  {name}: {count}" for name, count in sorted(self.by_error_class.items())]
        return "\n".join(lines)


def error_class_of(record: ConsumerRecord) -> str:
    for key, value in record.headers or ():
        if key == H_ERROR_CLASS:
            return value.decode(errors="replace")
    return "unknown"


async def replay_dlq(
    settings: Settings,
    selection: ReplayFilter,
    *,
    dry_run: bool = False,
    on_total: Callable[[int], None] = lambda _total: None,
    on_record: Callable[[], None] = lambda: None,
) -> ReplayReport:
    report = ReplayReport(dry_run=dry_run)
    client_kwargs = kafka_client_kwargs(settings)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, **client_kwargs)
    await start_client(consumer, settings)
    producer: AIOKafkaProducer | None = None
    try:
        tps = [
            TopicPartition(settings.dlq_topic, p)
            for p in await topic_partitions(settings, settings.dlq_topic)
        ]
        if not tps:
            return report
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await _start_offsets(consumer, tps, selection)
        remaining = {tp for tp in tps if starts[tp] < ends[tp]}
        on_total(sum(ends[tp] - starts[tp] for tp in tps))
        for tp in tps:
            consumer.seek(tp, starts[tp])
        if not dry_run:
            producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **client_kwargs)
            await start_client(producer, settings)
        pending: list[asyncio.Future[object]] = []
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    report.scanned += 1
                    on_record()
                    if not selection.matches(record):
                        continue
                    report.matched += 1
                    report.by_error_class[error_class_of(record)] += 1
                    if producer is not None:
                        pending.append(
                            await producer.send(
                                settings.sync_topic,
                                key=record.key,
                                value=record.value,
                                headers=[
                                    (REPLAY_HEADER, b"1"),
                                    (H_REPLAYED_FROM, f"{tp.topic}[{tp.partition}]@{record.offset}".encode()),
                                ],
                            )
                        )
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        for future in pending:
            await future
        report.replayed = len(pending)
        return report
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()


async def _start_offsets(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], selection: ReplayFilter
) -> dict[TopicPartition, int]:
    beginnings = await consumer.beginning_offsets(tps)
    if selection.since is None:
        return dict(beginnings)
    found = await consumer.offsets_for_times({tp: epoch_ms(selection.since) for tp in tps})
    ends = await consumer.end_offsets(tps)
    return {tp: found[tp].offset if found.get(tp) is not None else ends[tp] for tp in tps}
