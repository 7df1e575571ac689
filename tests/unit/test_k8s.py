"""The Kubernetes manifests render, are schema-valid, and agree with the code they deploy.

Rendering: `k8s/kustomize build` (kustomize v5, pinned in that script, built once from its Go module
and cached in $MEMSYNC_CACHE by scripts/bootstrap). The base and the production overlay are both
rendered and checked.

Schemas: every built-in object is validated offline with `kubernetes-validate` (PyPI; it bundles the
Kubernetes OpenAPI schemas), in strict mode (unknown fields are errors), against the oldest Kubernetes
we support and the newest the package knows. The Prometheus Operator objects (ServiceMonitor,
PrometheusRule) are custom resources, which kubernetes-validate does not know; `k8s/monitoring-check`
decodes them strictly into the operator's own Go API types (the Go module
github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring, pinned in
k8s/monitoring-check-go/go.mod, built once and cached like kustomize): an unknown or misspelled field,
a duplicate key or a wrongly typed value is an error. The Go types do not carry the CRDs' string
patterns and enums, so their content is then checked for meaning: the rules by promtool
(tests/unit/test_alert_rules.py), the scrape target here.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.kafka_secure_broker import make_pki

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZE = K8S / "kustomize"
MONITORING_CHECK = K8S / "monitoring-check"
RULES_FILE = K8S / "base" / "alerts" / "memsync-alerts.rules.yml"
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
KUSTOMIZATIONS = {"base": K8S / "base", "production": K8S / "overlays" / "production"}

# The container command everywhere: k8s StatefulSet, Dockerfile CMD, docker-compose worker.
WORKER_COMMAND = ["faust", "-A", "app", "worker", "-l", "info"]

# Oldest Kubernetes these manifests target (policy/v1 PDB, StatefulSet PVC retention policy, ...)
# and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# Budget of the terminationGracePeriodSeconds reasoning in k8s/base/statefulset.yaml, besides the two
# settings it depends on (SINK_BATCH_WITHIN_SECONDS, SINK_BACKOFF_MAX_SECONDS).
INSERT_BUDGET_S = 30  # one insert of a full batch
BACKOFF_JITTER_S = 1  # app/sink.py: wait_exponential_jitter(jitter=1.0)
FAUST_STOP_BUDGET_S = 15  # ack, commit, producer/changelog flush, group leave, RocksDB close


# ------------------------------------------------------------------ helpers shared with test_container


@functools.cache
def settings_module() -> ModuleType:
    """app/settings.py loaded on its own (not through `app`, whose import builds the Faust app)."""
    name = "_memsync_settings_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "app" / "settings.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@functools.cache
def settings_env_names() -> frozenset[str]:
    """Every environment variable app/settings.py reads.

    From its `ENV_VARIABLES` declaration when it has one (objects with `.name`, and `.names` or
    `.has_file` for secrets that also have a `NAME_FILE` variant); otherwise from its source: the
    names passed to the `_Env` readers (`env.str("X", ...)`, `name = "X"; env.int(name, ...)`) or
    to helpers taking `env` first (`_path(env, "X", ...)`), with `X_FILE` for `env.secret("X")`.
    """
    declared = getattr(settings_module(), "ENV_VARIABLES", None)
    if declared:
        names: set[str] = set()
        for var in declared:
            if getattr(var, "names", None):
                names.update(var.names)
            else:
                names.add(var.name)
                if getattr(var, "has_file", False):
                    names.add(f"{var.name}_FILE")
        return frozenset(names)
    return _env_names_from_source((ROOT / "app" / "settings.py").read_text())


def _env_names_from_source(source: str) -> frozenset[str]:
    readers = {"raw", "str", "bool", "int", "float", "choice", "secret", "existing_file", "cron", "names"}
    names: set[str] = set()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        local_constants = {
            target.id: node.value.value
            for node in ast.walk(function)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for call in ast.walk(function):
            if not isinstance(call, ast.Call):
                continue
            if (  # env.int("NAME", ...)
                isinstance(call.func, ast.Attribute)
                and call.func.attr in readers
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "env"
                and call.args
            ):
                argument, reader = call.args[0], call.func.attr
            elif (  # _helper(env, "NAME", ...)
                len(call.args) >= 2
                and isinstance(call.args[0], ast.Name)
                and call.args[0].id == "env"
                and isinstance(call.func, ast.Name)
            ):
                argument, reader = call.args[1], call.func.id
            else:
                continue
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                name = argument.value
            elif isinstance(argument, ast.Name) and argument.id in local_constants:
                name = local_constants[argument.id]
            else:
                continue
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                names.add(name)
                if "secret" in reader:
                    names.add(f"{name}_FILE")
    return frozenset(names)


def web_routes() -> set[str]:
    """Paths registered with `@app.page("/...")` anywhere in app/, agents/ or tables/."""
    routes: set[str] = set()
    for package in ("app", "agents", "tables"):
        for path in (ROOT / package).rglob("*.py"):
            routes.update(re.findall(r"\.page\(\s*[\"'](/[^\"']*)[\"']", path.read_text()))
    return routes


# ------------------------------------------------------------------ rendering


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [str(KUSTOMIZE), "build", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=900,  # the first call may build kustomize (scripts/bootstrap normally did already)
        check=False,
    )
    assert result.returncode == 0, f"k8s/kustomize build {name} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def worker_container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = only(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def configmap_data(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    container = worker_container(objects)
    names = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
    configmaps = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ConfigMap"}
    data: dict[str, str] = {}
    for name in names:
        assert name in configmaps, f"envFrom names ConfigMap {name}, which the kustomization does not make"
        data.update(configmaps[name].get("data", {}))
    return data


def plain_env(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The worker's environment as Kubernetes builds it: ConfigMap, then `env` (which wins)."""
    env = dict(configmap_data(objects))
    for var in worker_container(objects).get("env", []):
        env[var["name"]] = var.get("value", f"<from {next(iter(var.get('valueFrom', {'?': 0})))}>")
    return env


def secret_example() -> dict[str, Any]:
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return render(request.param)


# ------------------------------------------------------------------ schemas

MONITORING_GROUP = "monitoring.coreos.com"


class InvalidObject(Exception):
    """A rendered object its validator rejects (the message says which field and why)."""


def monitoring_verdicts(objects: list[dict[str, Any]]) -> list[str]:
    """k8s/monitoring-check's verdict line for each monitoring.coreos.com object, in order."""
    result = subprocess.run(
        [str(MONITORING_CHECK)],
        input=yaml.safe_dump_all(objects, sort_keys=False),
        capture_output=True,
        text=True,
        timeout=900,  # the first call may build the checker (scripts/bootstrap normally did already)
        check=False,
    )
    verdicts = result.stdout.splitlines()
    # Exit 1 means "an object is invalid", which its line says; anything else is the tool failing.
    assert result.returncode in (0, 1), f"k8s/monitoring-check failed:\n{result.stderr}"
    assert len(verdicts) == len(objects), f"not every object was checked:\n{result.stdout}{result.stderr}"
    return verdicts


def validate(obj: dict[str, Any]) -> None:
    """Strict validation: an unknown or misspelled field is an error, for built-in and custom objects."""
    if obj["apiVersion"].split("/")[0] == MONITORING_GROUP:
        (verdict,) = monitoring_verdicts([obj])
        if not verdict.startswith("valid "):
            raise InvalidObject(verdict)
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except jsonschema.ValidationError as error:  # kubernetes_validate.ValidationError subclasses it
            raise InvalidObject(f"Kubernetes {version}: {error.message} at {list(error.path)}") from error


def test_every_object_is_schema_valid(rendered):
    kinds = sorted(obj["kind"] for obj in rendered)
    assert kinds == sorted(
        ["ConfigMap", "PodDisruptionBudget", "PrometheusRule", "Service", "Service", "ServiceMonitor",
         "StatefulSet"]
    )
    for obj in rendered:
        try:
            validate(obj)
        except InvalidObject as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error}")


def test_the_secret_example_is_schema_valid():
    validate(secret_example())


def _with(obj: dict[str, Any], path: tuple[str | int, ...], rename: str) -> dict[str, Any]:
    """A deep copy of `obj` whose field at `path` is renamed to `rename` (a typo)."""
    broken = copy.deepcopy(obj)
    *parents, name = path
    holder: Any = broken
    for key in parents:
        holder = holder[key]
    holder[rename] = holder.pop(name)
    return broken


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("StatefulSet", ("spec", "replicas"), "replica"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), "intervall"),
        ("ServiceMonitor", ("spec", "selector"), "selectors"),
        ("ServiceMonitor", ("metadata", "labels"), "label"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "expr"), "expression"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "for"), "four"),
    ],
    ids=lambda value: ".".join(map(str, value)) if isinstance(value, tuple) else value,
)
def test_validation_rejects_a_typo(kind, path, typo):
    """The validators are strict: a misspelled field is an error, for built-in and custom objects."""
    obj = only(render("base"), kind)
    validate(obj)  # the original is valid: the typo alone is what fails
    with pytest.raises(InvalidObject, match=typo):
        validate(_with(obj, path, typo))


def test_monitoring_check_rejects_a_wrong_type_and_an_unchecked_kind():
    monitor = copy.deepcopy(only(render("base"), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["honorLabels"] = "no"
    probe = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Probe", "metadata": {"name": "x"}, "spec": {}}
    old = {**only(render("base"), "PrometheusRule"), "apiVersion": "monitoring.coreos.com/v1alpha1"}
    verdicts = monitoring_verdicts([monitor, probe, old])
    assert verdicts[0].startswith("invalid ServiceMonitor/memsync:"), verdicts
    assert "bool" in verdicts[0], verdicts
    assert verdicts[1].startswith("invalid Probe/x: kind Probe is not checked"), verdicts
    assert verdicts[2].startswith("invalid PrometheusRule/memsync: apiVersion"), verdicts


# ------------------------------------------------------------------ invariants


def test_env_names_are_settings_names(rendered):
    known = settings_env_names()
    used = set(configmap_data(rendered)) | {var["name"] for var in worker_container(rendered)["env"]}
    unknown = sorted(used - known)
    assert not unknown, f"variables app/settings.py does not read: {unknown}"
    assert {"ENABLE_REALTIME_SYNC", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SYNC_TOPIC", "KAFKA_DLQ_TOPIC",
            "KAFKA_CONSUMER_GROUP", "KAFKA_SECURITY_PROTOCOL", "BATCH_SIZE", "SYNC_LOOKBACK_HOURS"} <= used


def test_the_seed_environment(rendered):
    data = configmap_data(rendered)
    assert data["ENABLE_REALTIME_SYNC"] == "true"
    assert data["KAFKA_SYNC_TOPIC"] == "memory.sync.events"
    assert data["KAFKA_DLQ_TOPIC"] == "memory.sync.events.dlq"
    assert data["KAFKA_CONSUMER_GROUP"] == "memory-sync-consumer"
    assert data["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["BATCH_SIZE"] == "1000"
    assert data["SYNC_LOOKBACK_HOURS"] == "24"


def test_secrets_come_from_files_of_a_secret_volume(rendered):
    container = worker_container(rendered)
    pod = only(rendered, "StatefulSet")["spec"]["template"]["spec"]
    data = configmap_data(rendered)
    env = {var["name"]: var for var in container["env"]}
    for direct in ("KAFKA_SASL_PASSWORD", "CLICKHOUSE_PASSWORD", "MONGODB_URI"):
        assert direct not in env, f"{direct} must come from {direct}_FILE"
        assert direct not in data, f"{direct} must come from {direct}_FILE"
        assert f"{direct}_FILE" in env
    secret_volumes = {
        v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    example = secret_example()
    for name in ("KAFKA_SASL_PASSWORD_FILE", "CLICKHOUSE_PASSWORD_FILE", "MONGODB_URI_FILE"):
        path = Path(env[name]["value"])
        mount = mounts.get(str(path.parent))
        assert mount is not None, f"{name}={path}: nothing is mounted at {path.parent}"
        assert mount["name"] in secret_volumes, f"{name}={path} is not in a Secret volume"
        assert mount.get("readOnly") is True
        volume = secret_volumes[mount["name"]]
        item_paths = {item["path"]: item["key"] for item in volume["items"]}
        assert path.name in item_paths, f"{name}: {path.name} is not an item of Secret {volume['secretName']}"
        assert volume["secretName"] == example["metadata"]["name"]
        assert item_paths[path.name] in example["stringData"]
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == example["metadata"]["name"]
            assert ref["key"] in example["stringData"]


def test_the_rendered_configuration_is_accepted_by_settings(rendered, tmp_path):
    """The environment the pod gets parses with app/settings.py, and the Faust app built from it keeps
    its tables on the pod's own volume (files of Secret volumes stand in by temporary files holding
    the example Secret's values, and a CA generated here for a CA item)."""
    from app.factory import create_app
    from app.settings import Settings

    test_ca = make_pki(tmp_path / "pki").ca_cert.read_text()
    container = worker_container(rendered)
    pod = only(rendered, "StatefulSet")["spec"]["template"]["spec"]
    example = secret_example()["stringData"]
    secret_files: dict[str, str] = {}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        for item in volume.get("secret", {}).get("items", []):
            content = example.get(item["key"], test_ca)
            stand_in = tmp_path / mount["name"] / item["path"]
            stand_in.parent.mkdir(exist_ok=True)
            stand_in.write_text(content)
            secret_files[f"{mount['mountPath']}/{item['path']}"] = str(stand_in)
    env = dict(configmap_data(rendered))
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = secret_files.get(var["value"], var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = example[ref["key"]]
    env = {name: secret_files.get(value, value) for name, value in env.items()}
    settings = settings_module().Settings.from_env(env)
    assert str(settings.data_dir) == env["MEMSYNC_DATA_DIR"]
    assert settings.kafka_security.protocol == "SASL_SSL"

    # Faust's RocksDB tables live under app.conf.tabledir: it must be inside the PVC mount, or every
    # restart would recover all tables from their changelogs (and pods could share a directory).
    faust_app = create_app(Settings.from_env(env))
    data_volume = Path(env["MEMSYNC_DATA_DIR"])
    assert data_volume.is_absolute()
    assert Path(faust_app.conf.tabledir).is_relative_to(data_volume), (
        f"Faust's tabledir {faust_app.conf.tabledir} is not on the data volume {data_volume}"
    )


def test_each_worker_has_its_own_data_volume_mounted_at_memsync_data_dir(rendered):
    statefulset = only(rendered, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    data_dir = plain_env(rendered)["MEMSYNC_DATA_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in worker_container(rendered)["volumeMounts"]}
    assert data_dir in mounts, f"nothing is mounted at MEMSYNC_DATA_DIR={data_dir}"
    claim = mounts[data_dir]
    templates = {t["metadata"]["name"]: t for t in statefulset["spec"]["volumeClaimTemplates"]}
    assert claim in templates, f"{data_dir} is not a volumeClaimTemplate (one PVC per pod)"
    assert templates[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # A pod volume of the same name would replace the per-pod claim with one shared volume.
    assert claim not in {v["name"] for v in pod.get("volumes", [])}
    # Nothing else mounted at or inside it.
    assert [p for p in mounts if p == data_dir or p.startswith(data_dir.rstrip("/") + "/")] == [data_dir]


def test_probes_use_the_apps_routes_on_the_web_port(rendered):
    container = worker_container(rendered)
    web_port = int(plain_env(rendered).get("WEB_PORT", "6066"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"web": web_port}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                        ("startupProbe", "/healthz")):
        action = container[probe]["httpGet"]
        assert action["path"] == path, probe
        assert action["port"] in ("web", web_port), probe


def test_probe_and_metrics_routes_exist_in_the_app():
    routes = web_routes()
    # /metrics: the ServiceMonitor scrapes it (app/web.py serves Faust's sensor and memsync's metrics)
    assert {"/healthz", "/readyz", "/metrics"} <= routes, f"@app.page routes found: {sorted(routes)}"


def test_the_container_runs_the_faust_worker_hardened(rendered):
    statefulset = only(rendered, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = worker_container(rendered)
    assert container["command"] == WORKER_COMMAND
    assert "args" not in container
    assert re.fullmatch(r"[^:@]+(:[\w.-]+|@sha256:[0-9a-f]{64})", container["image"]), container["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["enableServiceLinks"] is False  # a Service named "web" would inject WEB_PORT=tcp://...
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert "memory" in container["resources"]["limits"]


def test_grace_period_lets_the_in_flight_batch_finish(rendered):
    statefulset = only(rendered, "StatefulSet")
    grace = statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    defaults = settings_module().Settings()
    data = configmap_data(rendered)
    within = float(data.get("SINK_BATCH_WITHIN_SECONDS", defaults.sink_batch_within_s))
    backoff = float(data.get("SINK_BACKOFF_MAX_SECONDS", defaults.sink_backoff_max_s))
    needed = within + INSERT_BUDGET_S + backoff + BACKOFF_JITTER_S + FAUST_STOP_BUDGET_S
    assert grace > within, "shorter than the sink batch window"
    assert grace >= needed, f"terminationGracePeriodSeconds={grace} < {needed} (see statefulset.yaml)"


def test_services_select_the_workers_and_target_the_web_port(rendered):
    statefulset = only(rendered, "StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert matches(statefulset["spec"]["selector"]["matchLabels"], pod_labels)
    services = {obj["metadata"]["name"]: obj for obj in rendered if obj["kind"] == "Service"}
    for service in services.values():
        assert matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["web"]
        # Not-ready workers stay reachable: they are not ready exactly while ClickHouse is down, when
        # their metrics matter most.
        assert service["spec"]["publishNotReadyAddresses"] is True
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"


def test_servicemonitor_scrapes_metrics_from_the_web_service(rendered):
    monitor = only(rendered, "ServiceMonitor")
    services = [obj for obj in rendered if obj["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in services if matches(selector, s["metadata"]["labels"])]
    assert len(selected) == 1, "the ServiceMonitor must select exactly one Service (no double scrape)"
    service = selected[0]
    assert service["spec"].get("clusterIP") != "None"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # Prometheus' target labels (job, instance) win: the alerts find workers by job=~".*memsync.*".
    assert endpoint.get("honorLabels", False) is False
    # The alerts find workers with up{job=~".*memsync.*"}; the operator's job label is the Service name.
    assert "memsync" in service["metadata"]["name"]
    assert "jobLabel" not in monitor["spec"]


def test_prometheusrule_is_the_plain_rules_file(rendered):
    rule = only(rendered, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    check = subprocess.run([str(K8S / "sync-alerts"), "--check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_pdb_protects_the_workers(rendered):
    statefulset = only(rendered, "StatefulSet")
    pdb = only(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == statefulset["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert statefulset["spec"]["replicas"] > 1


def test_overlay_changes_what_an_overlay_should():
    base, production = render("base"), render("production")
    assert {obj["metadata"].get("namespace") for obj in production} == {"memsync"}
    assert worker_container(production)["image"].startswith("registry.example.com/")
    assert only(production, "StatefulSet")["spec"]["replicas"] > only(base, "StatefulSet")["spec"]["replicas"]
    assert configmap_data(production)["CLICKHOUSE_URL"].startswith("clickhouses://")
    replicas = only(production, "StatefulSet")["spec"]["replicas"]
    assert replicas <= int(configmap_data(production)["KAFKA_TOPIC_PARTITIONS"]), "idle workers"


def test_env_names_from_source_fallback_finds_the_readers():
    """The fallback used when app/settings.py has no ENV_VARIABLES finds what it reads."""
    names = _env_names_from_source((ROOT / "app" / "settings.py").read_text())
    assert {"KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL", "MEMSYNC_DATA_DIR", "KAFKA_SASL_PASSWORD_FILE",
            "MONGODB_URI_FILE", "WEB_PORT"} <= names
