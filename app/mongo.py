"""MongoDB access: the async client built from settings (URI with credentials and TLS options passed
through as given)."""

from __future__ import annotations

from functools import cache
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.uri_parser import split_options

from app.settings import Settings

# memsync's defaults for options the URI may set itself. pymongo lets a keyword argument override the
# same option in the URI, so these are passed only when the URI does not name them.
_URI_DEFAULTS: dict[str, Any] = {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 5_000}


def _uri_option_names(uri: str) -> set[str]:
    query = uri.partition("?")[2]
    if not query:
        return set()
    return {name.lower() for name in split_options(query, validate=False, warn=False)}


def async_client(settings: Settings) -> AsyncMongoClient:
    uri = settings.mongodb_uri.value
    given = _uri_option_names(uri)
    defaults = {name: value for name, value in _URI_DEFAULTS.items() if name.lower() not in given}
    if "appname" not in given:
        defaults["appname"] = f"memsync-{settings.worker_id}"
    return AsyncMongoClient(uri, tz_aware=False, **defaults)


@cache
def shared_client() -> AsyncMongoClient:
    """The worker's one MongoDB client (probes, reconciliation, retention)."""
    from app import settings

    return async_client(settings)
