"""MongoDB access: the async client built from settings (URI with credentials and TLS options passed
through as given)."""

from __future__ import annotations

from functools import cache

from pymongo import AsyncMongoClient

from app.settings import Settings


def async_client(settings: Settings) -> AsyncMongoClient:
    return AsyncMongoClient(
        settings.mongodb_uri.value,
        serverSelectionTimeoutMS=10_000,
        connectTimeoutMS=5_000,
        tz_aware=False,
        appname=f"memsync-{settings.worker_id}",
    )


@cache
def shared_client() -> AsyncMongoClient:
    """The worker's one MongoDB client (probes, reconciliation, retention)."""
    from app import settings

    return async_client(settings)
