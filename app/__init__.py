"""memsync: MongoDB → Kafka → Faust → ClickHouse history sync.

`faust -A app worker` imports this package and runs `app`. The configuration comes from the
environment (app.settings); a bad value stops the process here with a message naming the variable.
"""

from __future__ import annotations

import sys

from app.settings import Settings, SettingsError

try:
    settings: Settings = Settings.from_env()
    from app.retention import RetentionPolicyManager

    retention_policies: RetentionPolicyManager = RetentionPolicyManager.from_settings(settings)
except SettingsError as _error:
    print(f"memsync: invalid configuration: {_error}", file=sys.stderr)
    raise SystemExit(2) from None

from app.factory import create_app

app = create_app(settings)

# Registers the `faust -A app <command>` commands: click resolves a subcommand right after importing
# the app module, before autodiscovery.
from app import commands  # noqa: E402

__all__ = ["app", "commands", "retention_policies", "settings"]
