"""The Dockerfile and docker-compose.yml agree with the code, the settings and the Kubernetes manifests.

No Docker engine runs here, so nothing is built or started: these are consistency checks of the files
as written (what they copy, run, expose and configure).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_k8s import WORKER_COMMAND, settings_env_names, settings_module

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
STATEFULSET = ROOT / "k8s" / "base" / "statefulset.yaml"
OFFICIAL_IMAGES = {"kafka": "apache/kafka", "mongo": "mongo", "clickhouse": "clickhouse/clickhouse-server"}


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def copied_sources(stage: list[tuple[str, str]]) -> set[str]:
    sources: set[str] = set()
    for arguments in instructions(stage, "COPY"):
        words = [word for word in shlex.split(arguments) if not word.startswith("--")]
        sources.update(word.rstrip("/") for word in words[:-1])
    return sources


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: object) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(value))


def worker_environment() -> dict[str, str]:
    environment = compose()["services"]["worker"]["environment"]
    assert isinstance(environment, dict), "write the worker's environment as a mapping"
    return {name: interpolate(value) for name, value in environment.items()}


def statefulset() -> dict[str, Any]:
    return yaml.safe_load(STATEFULSET.read_text())


def declared_packages() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    return {name.split(".")[0] for name in include}


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_is_multi_stage_on_python_slim():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert instructions(builder, "FROM") == ["python:3.11-slim AS builder"]
    assert instructions(final, "FROM") == ["python:3.11-slim"]
    assert any("pip wheel" in run for run in instructions(builder, "RUN"))


def test_final_image_has_no_compilers_and_runs_as_a_non_root_user():
    final = dockerfile_stages()[-1]
    runs = " ".join(instructions(final, "RUN"))
    for tool in ("build-essential", "gcc", "g++", "make", "apt-get install"):
        assert tool not in runs, f"the final stage installs {tool}"
    assert "--no-index" in runs, "the final stage must install only the builder's wheels"
    (user,) = instructions(final, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric USER (runAsNonRoot can only check a number)"
    assert int(uid) != 0, "a non-root USER"
    assert int(uid) == statefulset()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_image_copies_the_packages_setup_cfg_declares():
    final = dockerfile_stages()[-1]
    (workdir,) = instructions(final, "WORKDIR")
    assert workdir.startswith("/")
    copied = copied_sources(final)
    packages = declared_packages()
    assert packages == {"app", "agents", "tables"}
    missing = sorted((packages | {"schemas"}) - copied)
    assert not missing, f"the final stage does not COPY {missing}"
    assert not copied & {"tests", "bench", "scripts", ".", "k8s"}, "only runtime code in the image"
    # The builder needs the metadata pip reads (setup.cfg reads README.md as long_description).
    assert {"setup.cfg", "pyproject.toml", "README.md"} <= copied_sources(dockerfile_stages()[0])


def test_dockerignore_keeps_local_state_out_but_not_what_is_copied():
    ignored = {
        line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".stack", "data"} <= ignored
    needed = set().union(*(copied_sources(stage) for stage in dockerfile_stages()))
    assert not needed & ignored, f"COPY sources excluded by .dockerignore: {sorted(needed & ignored)}"


def test_cmd_is_the_kubernetes_command():
    final = dockerfile_stages()[-1]
    (cmd,) = instructions(final, "CMD")
    assert json.loads(cmd) == WORKER_COMMAND
    assert not instructions(final, "ENTRYPOINT")
    (container,) = statefulset()["spec"]["template"]["spec"]["containers"]
    assert container["command"] == WORKER_COMMAND


def test_exposed_port_and_data_dir_match_settings_and_kubernetes():
    final = dockerfile_stages()[-1]
    assert instructions(final, "EXPOSE") == [str(settings_module().Settings().web_port)]
    env_line = " ".join(instructions(final, "ENV"))
    (data_dir,) = re.findall(r"MEMSYNC_DATA_DIR=(\S+)", env_line)
    (container,) = statefulset()["spec"]["template"]["spec"]["containers"]
    k8s_env = {var["name"]: var.get("value") for var in container["env"]}
    assert k8s_env["MEMSYNC_DATA_DIR"] == data_dir
    assert worker_environment()["MEMSYNC_DATA_DIR"] == data_dir
    assert data_dir in " ".join(instructions(final, "VOLUME"))
    # The image's own variables are Python's or memsync's, nothing else.
    names = set(re.findall(r"(\w+)=", env_line))
    assert names - settings_env_names() <= {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONPATH"}


# ------------------------------------------------------------------ docker-compose.yml


def test_compose_uses_the_official_images():
    services = compose()["services"]
    for service, image in OFFICIAL_IMAGES.items():
        name, _, tag = services[service]["image"].partition(":")
        assert name == image, services[service]["image"]
        assert tag not in ("", "latest"), f"pin {service}'s image tag"
    stack = (ROOT / "scripts" / "stack").read_text()
    (kafka_version,) = re.findall(r'^KAFKA_VERSION = "([^"]+)"', stack, flags=re.MULTILINE)
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}", "same Kafka as scripts/stack"
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    # As in scripts/stack: the app creates its topics, so a misspelt topic fails instead of appearing.
    assert str(services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"


def test_compose_worker_is_built_from_the_dockerfile_and_runs_the_same_command():
    worker = compose()["services"]["worker"]
    assert worker["build"] in (".", {"context": "."})
    assert worker.get("command", WORKER_COMMAND) == WORKER_COMMAND
    for service in OFFICIAL_IMAGES:
        assert worker["depends_on"][service]["condition"] == "service_healthy"
        assert "healthcheck" in compose()["services"][service]
    grace = statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert worker["stop_grace_period"] == f"{grace}s", "same shutdown budget as Kubernetes"


def test_compose_worker_env_names_are_settings_names():
    unknown = sorted(set(worker_environment()) - settings_env_names())
    assert not unknown, f"variables app/settings.py does not read: {unknown}"


def test_compose_worker_configuration_is_valid_and_points_at_the_compose_services():
    environment = worker_environment()
    settings = settings_module().Settings.from_env(environment)
    services = compose()["services"]
    kafka_env = services["kafka"]["environment"]
    for server in settings.kafka_bootstrap_servers:
        assert f"PLAINTEXT://{server}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert settings.kafka_security.protocol == "PLAINTEXT"
    assert settings.clickhouse.host == "clickhouse"
    assert settings.clickhouse.user == services["clickhouse"]["environment"]["CLICKHOUSE_USER"]
    assert settings.clickhouse.password.value == interpolate(
        services["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"]
    )
    assert "@mongo:" in settings.mongodb_uri.value or "//mongo:" in settings.mongodb_uri.value
    volumes = [volume.split(":")[1] for volume in services["worker"]["volumes"]]
    assert str(settings.data_dir) in volumes, "the worker's RocksDB tables must live on a volume"
    published = [port.split(":")[-1] for port in services["worker"]["ports"]]
    assert str(settings.web_port) in published


@pytest.mark.parametrize("service", sorted(OFFICIAL_IMAGES))
def test_compose_data_is_persisted(service):
    assert compose()["services"][service].get("volumes"), f"{service} keeps its data in the container"
