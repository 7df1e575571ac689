"""`UnifiedMemoryClient`: the application's entry point. `save()` writes MongoDB, then publishes a
`MemorySyncEvent` to Kafka as a Faust record.

Every document memsync writes carries `version` (1, 2, 3, … per document, bumped atomically with an
optimistic compare-and-swap on the previous version), `updated_at` (UTC, millisecond precision) and
`data_type`. `event_id` is derived from (collection, entity_id, version), so the batch reconciliation
computes the same identity for the same version.

A publish failure after the MongoDB write is never silent: `save()` raises `PublishError` (the
document *is* saved) and counts it in `memory_sync_publish_failures_total`; the reconciliation run
(daily, or `faust -A app sync-batch` on demand) writes the missing history row because the document's
`updated_at` falls in its look-back window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from bson import ObjectId
from faust.types import AppT, TopicT
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from app import docjson, metrics
from app.factory import create_app, event_topic
from app.identity import (
    DATA_TYPE_FIELD,
    MANAGED_FIELDS,
    UPDATED_AT_FIELD,
    VERSION_FIELD,
    entity_id_of,
    epoch_ms,
    event_id_for,
    now_ms_precision,
    operation_for,
)
from app.records import MemorySyncEvent
from app.settings import Settings

MAX_CAS_ATTEMPTS = 20


class PublishError(RuntimeError):
    """The document was written to MongoDB but its event could not be published.

    Reconciliation repairs the history; the caller may retry `save()` (a new version) or move on.
    """

    def __init__(self, event: MemorySyncEvent, cause: BaseException) -> None:
        super().__init__(
            f"saved {event.collection}/{event.entity_id} version event {event.event_id} to MongoDB, "
            f"but publishing failed: {type(cause).__name__}: {cause}"
        )
        self.event = event


class ConcurrentUpdateError(RuntimeError):
    """Too many concurrent writers of one document; nothing was written."""


@dataclass(frozen=True)
class SaveResult:
    event: MemorySyncEvent
    version: int
    document: dict[str, Any]


class UnifiedMemoryClient:
    def __init__(
        self,
        mongo: AsyncMongoClient,
        database: str,
        app: AppT,
        topic: TopicT,
        *,
        max_document_bytes: int = 1_000_000,
        publish_timeout_s: float = 30.0,
        publish: bool = True,
    ) -> None:
        self.mongo = mongo
        self.db = mongo[database]
        self.app = app
        self.topic = topic
        self.max_document_bytes = max_document_bytes
        self.publish_timeout_s = publish_timeout_s
        # ENABLE_REALTIME_SYNC=false: MongoDB only; the history follows through reconciliation.
        self.publish = publish

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> UnifiedMemoryClient:
        """A client for the process's settings, or for `settings` with a Faust app of its own."""
        from app.mongo import async_client

        if settings is None:
            from app import app, settings
            from app.topics import sync_events_out

            topic = sync_events_out
        else:
            app = create_app(settings)
            topic = event_topic(app, settings)
        return cls(
            async_client(settings),
            settings.mongodb_database,
            app,
            topic,
            max_document_bytes=settings.max_document_bytes,
            publish=settings.enable_realtime_sync,
        )

    async def start(self) -> None:
        """Start the Kafka producer and make sure the topic exists."""
        if not self.publish:
            return
        await self.app.maybe_start_producer()
        await self.topic.maybe_declare()

    async def stop(self) -> None:
        if self.publish:
            producer = self.app.producer
            await producer.flush()
            await producer.stop()
        await self.mongo.close()

    async def save(
        self,
        collection: str,
        doc: Mapping[str, Any],
        data_type: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> SaveResult:
        """Insert or replace `doc` (by `_id`; a new ObjectId when absent) and publish its event."""
        body = {k: v for k, v in doc.items() if k != "_id" and k not in MANAGED_FIELDS}
        document_id = doc.get("_id", ObjectId())
        coll = self.db[collection]
        for _ in range(MAX_CAS_ATTEMPTS):
            current = await coll.find_one({"_id": document_id}, {VERSION_FIELD: 1})
            version = int(current.get(VERSION_FIELD, 0)) + 1 if current else 1
            stored = docjson.normalise(
                {
                    "_id": document_id,
                    **body,
                    DATA_TYPE_FIELD: data_type,
                    VERSION_FIELD: version,
                    UPDATED_AT_FIELD: now_ms_precision(),
                }
            )
            data = docjson.encode_checked(stored, self.max_document_bytes)
            if current is None:
                try:
                    await coll.insert_one(stored)
                except DuplicateKeyError:
                    continue
            else:
                result = await coll.replace_one(
                    {"_id": document_id, VERSION_FIELD: current.get(VERSION_FIELD)}, stored
                )
                if result.matched_count != 1:
                    continue
            event = self._event(collection, stored, data, data_type, metadata, deleted=False)
            await self._publish(event)
            return SaveResult(event, version, stored)
        raise ConcurrentUpdateError(f"{collection}/{document_id}: {MAX_CAS_ATTEMPTS} concurrent updates")

    async def delete(
        self, collection: str, entity: Any, metadata: Mapping[str, Any] | None = None
    ) -> SaveResult | None:
        """Delete a document by `_id`; its history gets a DELETE row with the next version.

        Returns None when there was no such document.
        """
        removed = await self.db[collection].find_one_and_delete({"_id": entity})
        if removed is None:
            return None
        version = int(removed.get(VERSION_FIELD, 0)) + 1
        tombstone = docjson.normalise(
            {**removed, VERSION_FIELD: version, UPDATED_AT_FIELD: now_ms_precision()}
        )
        data_type = str(removed.get(DATA_TYPE_FIELD, "unknown"))
        event = self._event(
            collection, tombstone, docjson.encode(tombstone), data_type, metadata, deleted=True
        )
        await self._publish(event)
        return SaveResult(event, version, tombstone)

    def _event(
        self,
        collection: str,
        stored: dict[str, Any],
        data: str,
        data_type: str,
        metadata: Mapping[str, Any] | None,
        *,
        deleted: bool,
    ) -> MemorySyncEvent:
        entity_id = entity_id_of(stored["_id"])
        version = int(stored[VERSION_FIELD])
        return MemorySyncEvent(
            event_id=event_id_for(collection, entity_id, version),
            entity_id=entity_id,
            data_type=data_type,
            operation=operation_for(version, deleted=deleted),
            collection=collection,
            timestamp=epoch_ms(stored[UPDATED_AT_FIELD]),
            data=data,
            metadata=orjson.dumps(dict(metadata)).decode() if metadata is not None else None,
        )

    async def _publish(self, event: MemorySyncEvent) -> None:
        if not self.publish:
            return
        started = time.perf_counter()
        try:
            delivery = await self.topic.send(key=event.entity_id.encode(), value=event)
            await asyncio.wait_for(delivery, self.publish_timeout_s)
        except Exception as exc:
            metrics.publish_failures.inc()
            raise PublishError(event, exc) from exc
        metrics.publish_latency.observe(time.perf_counter() - started)
        metrics.events_published.labels(self.topic.get_topic_name()).inc()
