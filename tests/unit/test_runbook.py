"""docs/runbook.md and docs/operations.md name only things that exist, so an operator can paste them:

- every `faust -A app <command> --option` (code blocks and inline code) is a registered command with
  those options;
- every metric named is one a worker or producer exports (with the label names it has), and every
  `promql` block parses (`promtool check rules` on the queries as recording rules);
- every Kafka tool class exists in the Kafka jars and takes the options the runbook gives it;
- every environment variable named is one app/settings.py reads; every web path is a route;
- the runbook's links to its own sections resolve, and each alert has its section.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from app.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "runbook.md"
OPERATIONS = ROOT / "docs" / "operations.md"
DOCS = (RUNBOOK, OPERATIONS)
RULES_FILE = ROOT / "k8s" / "base" / "alerts" / "memsync-alerts.rules.yml"

TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
# Names the docs mention on purpose that are not exported: Faust's original name of a renamed metric.
NOT_EXPORTED_ON_PURPOSE = {"faust_events_runtime_ms"}
# Variables of the runbook's shell examples and of prometheus_client, not memsync settings.
OTHER_VARIABLES = {"MEMSYNC_KAFKA_LIBS", "BOOTSTRAP", "PROMETHEUS_MULTIPROC_DIR", "CONTENT_TYPE_LATEST"}


def code_blocks(path: Path, language: str | None = None) -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [body for lang, body in blocks if language is None or lang == language]


def inline_code(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"`([^`\n]+)`", text)


def shell_lines(block: str) -> list[str]:
    """Lines of a shell block with `\\` continuations joined."""
    return block.replace("\\\n", " ").splitlines()


# ------------------------------------------------------------------ faust -A app commands


@functools.cache
def faust_cli() -> object:
    import faust.cli.faust  # noqa: F401  (registers Faust's built-in commands)
    from faust.cli.base import cli

    import app  # noqa: F401  (registers memsync's commands)

    return cli


def options_of(command: object) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def faust_invocations() -> list[tuple[Path, str]]:
    found = []
    for path in DOCS:
        texts = [line for block in code_blocks(path) for line in shell_lines(block)] + inline_code(path)
        for text in texts:
            for match in re.finditer(r"\bfaust -A app\b(.*)", text):
                found.append((path, match.group(1)))
    return found


def test_the_runbook_uses_the_memsync_commands():
    used = {re.match(r"\s*(?:--json\s+)?([\w-]+)", rest).group(1) for _, rest in faust_invocations()}
    assert {"sync-batch", "dlq-replay", "retention"} <= used


@pytest.mark.parametrize(
    ("path", "rest"), faust_invocations(), ids=[f"{p.name}:{r.strip()}" for p, r in faust_invocations()]
)
def test_faust_commands_and_options_exist(path, rest):
    cli = faust_cli()
    rest = rest.split(" #")[0].replace("\\|", "|")
    tokens = [t for t in re.split(r"[\s\[\]|]+", rest) if t]
    global_options = options_of(cli)
    while tokens and tokens[0].startswith("-"):
        assert tokens.pop(0) in global_options, f"{path.name}: faust -A app{rest}"
    assert tokens, f"{path.name}: `faust -A app` without a command"
    name = tokens.pop(0)
    assert name in cli.commands, (
        f"{path.name}: `faust -A app {name}` is not a command ({sorted(cli.commands)})"
    )
    known = options_of(cli.commands[name])
    for token in tokens:
        if token.startswith("--"):
            assert token.split("=")[0] in known, (
                f"{path.name}: {name} has no option {token} ({sorted(known)})"
            )


# ------------------------------------------------------------------ metrics and queries


@functools.cache
def exported() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample name -> (metric name, label names) of every series a worker or producer exports:
    app/metrics.py's metrics and Faust's sensor metrics as app/web.py sets them up."""
    from prometheus_client.metrics import MetricWrapperBase

    from app import metrics, web

    collectors = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]
    collectors += list(web.faust_metrics)
    series: dict[str, tuple[str, frozenset[str]]] = {}
    for collector in collectors:
        labels = frozenset(collector._labelnames)
        for family in collector.describe():
            name, kind = family.name, family.type
            if kind == "counter":
                names = {f"{name}_total", f"{name}_created"}
            elif kind == "histogram":
                names = {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
                series[f"{name}_bucket"] = (name, labels | {"le"})
            else:
                names = {name}
            for sample_name in names:
                series[sample_name] = (name, labels)
    return series


def test_the_docs_name_only_exported_metrics():
    known = exported()
    for path in DOCS:
        named = set(re.findall(r"\b((?:memory_sync|faust)_[a-z_]+)\b", path.read_text()))
        unknown = sorted(named - set(known) - NOT_EXPORTED_ON_PURPOSE)
        assert not unknown, f"{path.name} names metrics nothing exports: {unknown}"
    seed = {
        "memory_sync_events_published_total",
        "memory_sync_publish_latency_seconds",
        "memory_sync_events_consumed_total",
        "memory_sync_consume_latency_seconds",
        "memory_sync_consumer_lag",
        "memory_sync_dlq_events_total",
        "memory_sync_duplicate_events_skipped_total",
    }
    assert seed <= set(known)
    assert seed <= set(re.findall(r"\bmemory_sync_[a-z_]+", OPERATIONS.read_text()))


def promql_queries() -> list[str]:
    return [
        line.strip()
        for block in code_blocks(RUNBOOK, "promql")
        for line in block.splitlines()
        if line.strip()
    ]


def test_queries_select_labels_the_metrics_have():
    known = exported()
    queries = promql_queries()
    assert len(queries) >= 20
    for query in queries:
        for metric, matchers in re.findall(r"\b((?:memory_sync|faust)_\w+)\{([^}]*)\}", query):
            pairs = dict(re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', matchers))
            unknown = set(pairs) - known[metric][1] - TARGET_LABELS
            assert not unknown, f"{query}: {metric} has no label {sorted(unknown)}"
        # `job` is the scrape job (memsync's workers), never a scheduled job (that is `job_name`)
        for value in re.findall(r'\bjob\s*(?:=~|=)\s*"([^"]*)"', query):
            assert "memsync" in value, f"{query}: job={value!r} is not the workers' scrape job"


def test_queries_parse_with_promtool(tmp_path):
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run scripts/bootstrap (Debian package `prometheus`)")
    rules = {
        "groups": [
            {
                "name": "runbook",
                "rules": [
                    {"record": f"runbook:query_{i}", "expr": q} for i, q in enumerate(promql_queries())
                ],
            }
        ]
    }
    path = tmp_path / "runbook-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [binary, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ Kafka tools


def kafka_libs() -> Path:
    libs = Path(os.environ.get("MEMSYNC_KAFKA_LIBS") or Path.home() / ".cache/memsync/kafka-4.1.1/libs")
    if not libs.is_dir():
        pytest.fail(f"no Kafka jars at {libs}: run `scripts/stack up` (it downloads them)")
    return libs


def kafka_invocations() -> list[tuple[str, tuple[str, ...]]]:
    found = []
    for block in code_blocks(RUNBOOK, "sh"):
        for line in shell_lines(block):
            if line.lstrip().startswith("java "):
                words = shlex.split(line, comments=True)
                cls = words[words.index("-cp") + 2]
                found.append((cls, tuple(w for w in words if w.startswith("--"))))
    return found


def test_the_runbook_uses_the_kafka_tools():
    classes = {cls for cls, _ in kafka_invocations()}
    assert {
        "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "org.apache.kafka.tools.consumer.ConsoleConsumer",
    } <= classes


def test_kafka_tool_classes_exist_and_take_the_options_given():
    libs = kafka_libs()
    entries: set[str] = set()
    for jar in libs.glob("*.jar"):
        with zipfile.ZipFile(jar) as archive:
            entries.update(archive.namelist())
    options: dict[str, set[str]] = {}
    for cls, used in kafka_invocations():
        assert cls.replace(".", "/") + ".class" in entries, f"{cls} is in no jar of {libs}"
        options.setdefault(cls, set()).update(used)
    documented = {"--command-config", "--consumer.config"}  # the SASL_SSL note, per tool
    for cls, used in options.items():
        result = subprocess.run(
            ["java", "-cp", f"{libs}/*", cls, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        accepted = set(re.findall(r"^(--[\w.-]+)", result.stdout + result.stderr, flags=re.MULTILINE))
        assert accepted, f"{cls} --help printed no options:\n{result.stdout}{result.stderr}"
        unknown = used - accepted
        assert not unknown, f"{cls} has no option {sorted(unknown)}"
        assert accepted & documented, f"{cls} takes neither {sorted(documented)}"


# ------------------------------------------------------------------ settings, routes, links


def test_the_docs_name_only_real_settings():
    for path in DOCS:
        named = {
            match
            for code in inline_code(path)
            for match in re.findall(r"^([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?:=.*)?$", code.strip())
        }
        unknown = sorted(named - ENV_NAMES - OTHER_VARIABLES)
        assert not unknown, f"{path.name} names settings app/settings.py does not read: {unknown}"


def test_the_runbook_web_paths_are_routes():
    from tests.unit.test_k8s import web_routes

    routes = web_routes()
    used = {code for code in inline_code(RUNBOOK) if re.fullmatch(r"/[\w/]+", code)}
    used |= set(re.findall(r"localhost:6066(/[\w/]*)", RUNBOOK.read_text()))
    assert {"/readyz", "/stats", "/stats/html", "/metrics", "/healthz"} <= used
    assert used <= routes, f"not routes of the worker: {sorted(used - routes)}"


def test_the_runbook_links_resolve():
    from tests.unit.test_alert_rules import github_anchors, rules

    text = RUNBOOK.read_text()
    anchors = github_anchors(text)
    links = set(re.findall(r"\]\(#([\w-]+)\)", text))
    assert links <= anchors, f"broken links: {sorted(links - anchors)}"
    assert {name.lower() for name in rules()} <= links  # the table of contents lists every alert
    for doc in re.findall(r"\]\(([\w.-]+\.md)\)", text):
        assert (RUNBOOK.parent / doc).exists(), doc
