"""Shared test fixtures.

Integration and fault tests talk to the real local stack (`scripts/stack up`), whose addresses arrive
in the environment (`eval "$(scripts/stack status)"`, done by `make test` and `.ci/run`). A test that
needs a server and cannot reach it fails; nothing here skips.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StackEnv:
    kafka_bootstrap: str
    mongodb_uri: str
    clickhouse_url: str
    stack_dir: Path


def _require(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: integration tests need the local stack. "
            'Run `make test`, or `scripts/stack up` and `eval "$(scripts/stack status)"` first.',
            pytrace=False,
        )
    return value


@pytest.fixture(scope="session")
def stack() -> StackEnv:
    return StackEnv(
        kafka_bootstrap=_require("KAFKA_BOOTSTRAP_SERVERS"),
        mongodb_uri=_require("MONGODB_URI"),
        clickhouse_url=_require("CLICKHOUSE_URL"),
        stack_dir=Path(_require("MEMSYNC_STACK_DIR")),
    )


@pytest.fixture
def unique_name() -> str:
    """A short name unique to this test, for topics, groups, databases and tables."""
    return "t" + uuid.uuid4().hex[:12]
