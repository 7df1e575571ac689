"""memsync: MongoDB → Kafka → Faust → ClickHouse history sync.

`faust -A app worker` imports this package and runs `app`. The configuration comes from the
environment (app.settings); a bad value stops the process here with a message naming the variable.
"""

from __future__ import annotations

import logging
import sys

import faust

from app.settings import Settings, SettingsError, check_tls_files

try:
    settings: Settings = Settings.from_env()
    check_tls_files(settings)
    from app.retention import RetentionPolicyManager

    retention_policies: RetentionPolicyManager = RetentionPolicyManager.from_settings(settings)
    from app.factory import create_app

    app: faust.App = create_app(settings)
except SettingsError as _error:
    print(f"memsync: invalid configuration: {_error}", file=sys.stderr)
    raise SystemExit(2) from None

# LOG_LEVEL sets memsync's own loggers; `faust ... -l LEVEL` sets everything else's.
for _logger in ("app", "agents", "tables"):
    logging.getLogger(_logger).setLevel(settings.log_level.upper())

# Registers the `faust -A app <command>` commands: click resolves a subcommand right after importing
# the app module, before autodiscovery.
from app import commands  # noqa: E402

__all__ = ["app", "commands", "retention_policies", "settings"]
