"""Retention policy parsing and validation: errors name the setting and the offending key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from app.retention import PolicyError, RetentionPolicy, RetentionPolicyManager
from app.settings import Settings, SettingsError
from tests.conftest import ROOT

VALID = {
    "default": {"history_days": 365},
    "data_types": {
        "context": {"history_days": 90, "documents_days": 30},
        "episode": {"history_days": None},
        "fact": {},
    },
}


def parse(document: object, setting: str = "RETENTION_POLICIES") -> RetentionPolicyManager:
    return RetentionPolicyManager.parse(json.dumps(document), setting)


def test_valid_policies_and_the_default():
    manager = parse(VALID)
    assert manager.policy_for("context") == RetentionPolicy(history_days=90, documents_days=30)
    assert manager.policy_for("episode") == RetentionPolicy()  # explicit null: keep forever
    assert manager.policy_for("fact") == RetentionPolicy()
    assert manager.policy_for("anything-else") == RetentionPolicy(history_days=365)
    assert manager.describe()["data_types"]["context"] == {"history_days": 90, "documents_days": 30}


def test_nothing_configured_keeps_everything():
    manager = RetentionPolicyManager.from_settings(Settings.from_env({}))
    assert manager.policy_for("context") == RetentionPolicy()
    assert parse({}).default == RetentionPolicy()


def test_cutoffs():
    now = datetime(2024, 6, 15, tzinfo=UTC)
    policy = RetentionPolicy(history_days=30, documents_days=7)
    assert policy.history_cutoff(now) == now - timedelta(days=30)
    assert policy.documents_cutoff(now) == now - timedelta(days=7)
    assert RetentionPolicy().history_cutoff(now) is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"defaults": {}}, "RETENTION_POLICIES: unknown key 'defaults' (allowed: default, data_types)"),
        (
            {"data_types": {"context": {"histroy_days": 3}}},
            "RETENTION_POLICIES: data_types.context: unknown key 'histroy_days' "
            "(allowed: history_days, documents_days)",
        ),
        (
            {"data_types": {"context": {"history_days": -1}}},
            "RETENTION_POLICIES: data_types.context.history_days must be at least 1 day "
            "(null keeps forever), got -1",
        ),
        (
            {"default": {"documents_days": -30}},
            "RETENTION_POLICIES: default.documents_days must be at least 1 day (null keeps forever), got -30",
        ),
        ({"default": {"history_days": 0}}, "default.history_days must be at least 1 day"),
        ({"default": {"history_days": 1.5}}, "default.history_days must be a whole number of days"),
        ({"default": {"history_days": "30"}}, "default.history_days must be a whole number of days"),
        ({"default": {"history_days": True}}, "default.history_days must be a whole number of days"),
        ({"default": {"history_days": 10**9}}, "default.history_days must be at most 100000 days"),
        ({"default": 30}, "RETENTION_POLICIES: default must be an object"),
        ({"data_types": ["context"]}, "RETENTION_POLICIES: data_types must be an object"),
        ({"data_types": {" ": {}}}, "data_types has an empty data type name"),
        ([], "RETENTION_POLICIES must be a JSON object"),
    ],
)
def test_invalid_policies_name_the_setting_and_the_key(document, message):
    with pytest.raises(PolicyError) as caught:
        parse(document)
    assert message in str(caught.value)


def test_invalid_json():
    with pytest.raises(PolicyError, match="RETENTION_POLICIES is not valid JSON"):
        RetentionPolicyManager.parse("{history_days: 3}", "RETENTION_POLICIES")


def test_policy_errors_are_settings_errors():
    assert issubclass(PolicyError, SettingsError)


def test_loaded_from_the_file(tmp_path):
    path = tmp_path / "retention.json"
    path.write_text(json.dumps(VALID))
    manager = RetentionPolicyManager.from_settings(Settings.from_env({"RETENTION_POLICIES_FILE": str(path)}))
    assert manager.policy_for("context").history_days == 90
    assert manager.source == "RETENTION_POLICIES_FILE"

    path.write_text(json.dumps({"data_types": {"context": {"history_days": -5}}}))
    with pytest.raises(PolicyError, match=r"^RETENTION_POLICIES_FILE: data_types\.context\.history_days"):
        RetentionPolicyManager.from_settings(Settings.from_env({"RETENTION_POLICIES_FILE": str(path)}))


def test_inline_policies_from_the_environment():
    settings = Settings.from_env({"RETENTION_POLICIES": json.dumps(VALID)})
    assert RetentionPolicyManager.from_settings(settings).policy_for("other").history_days == 365


def test_the_process_refuses_to_start_with_invalid_policies():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    env["RETENTION_POLICIES"] = json.dumps({"data_types": {"context": {"history_days": -1}}})
    result = subprocess.run(
        [sys.executable, "-c", "import app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert (
        "memsync: invalid configuration: RETENTION_POLICIES: data_types.context.history_days" in result.stderr
    )
