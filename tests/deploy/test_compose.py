"""What can be checked of ``deploy/compose.yaml``, its Dockerfile and the systemd units
without a container engine: that they name real settings keys, with values the node
accepts; real `precedent` commands; ports, hosts and paths that agree from one service to
the next; and the same settings in the node and in the workers. The topology itself runs,
as processes, in ``test_topology.py``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from node.settings import Settings, load_settings
from tests.deploy.compose_yaml import UnreadYaml, interpolate, load
from tests.support.nodes import run_precedent

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
SERVICES = ("redis", "postgres", "orthanc", "precedent-node", "precedent-worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    found = compose["services"][name]
    assert isinstance(found, dict)
    return found


def environment(compose: dict[str, Any], name: str) -> dict[str, str]:
    """A service's environment as the container gets it: strings, ``${…}`` resolved."""
    return {key: interpolate(str(value)) for key, value in service(compose, name)["environment"].items()}


def settings_of(compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a `precedent` process of the service would run with."""
    with monkeypatch.context() as patched:
        for variable in [v for v in os.environ if v.startswith("PRECEDENT_")]:
            patched.delenv(variable)
        for variable, value in environment(compose, name).items():
            patched.setenv(variable, value)
        return load_settings()


def help_of(command: str) -> str:
    """``precedent COMMAND --help``, from the installed entry point: it exists, or fails."""
    done = run_precedent(command, "--help")
    assert done.returncode == 0, f"precedent {command}: {done.stderr[-500:]}"
    return done.stdout


def published(ports: list[str]) -> dict[int, str]:
    """Container port → the host address:port it is published on."""
    found = {}
    for entry in ports:
        *host, container = entry.split(":")
        found[int(container)] = ":".join(host)
    return found


# --- the reader ---------------------------------------------------------------------------------


def test_the_reader_agrees_with_pyyaml_where_pyyaml_is_installed(compose: dict[str, Any]) -> None:
    """PyYAML is not a dependency; the system's Python often has it (Debian: python3-yaml)."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 to read the file with PyYAML")
    script = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    done = subprocess.run(
        [system_python, "-c", script],
        input=COMPOSE.read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 and "No module named 'yaml'" in done.stderr:
        pytest.skip("the system's python3 has no PyYAML")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == compose


@pytest.mark.parametrize(
    "text",
    [
        "a: {b: 1}\n",  # flow mapping
        "a: |\n  text\n",  # block scalar
        "a:\n  - b: 1\n",  # mapping in a sequence
        "a: *nothing\n",  # alias
        "a: 1\na: 2\n",  # a key twice
        'a: "\\n"\n',  # escapes
    ],
)
def test_the_reader_refuses_yaml_it_does_not_read(text: str) -> None:
    with pytest.raises(UnreadYaml):
        load(text)


# --- the compose file ----------------------------------------------------------------------------


def test_the_site_has_its_five_services_and_the_workers_scale(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == set(SERVICES)
    worker = service(compose, "precedent-worker")
    assert worker["deploy"]["replicas"] >= 2
    # `docker compose up --scale` needs services without fixed names or host ports.
    assert "container_name" not in worker and "ports" not in worker


def test_every_precedent_variable_is_a_settings_key_with_a_value_the_node_accepts(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = Settings.model_fields
    for name in ("precedent-node", "precedent-worker"):
        for variable in environment(compose, name):
            if not variable.startswith("PRECEDENT_"):
                continue
            section, _, key = variable.removeprefix("PRECEDENT_").lower().partition("__")
            assert section in sections, f"{name}: {variable}: no section {section!r}"
            if key:
                model = sections[section].annotation
                assert isinstance(model, type), variable
                assert key in model.model_fields, f"{name}: {variable}: no key {section}.{key}"
        settings_of(compose, name, monkeypatch)  # raises ConfigError, naming the key, if not


def test_node_and_workers_run_with_the_same_catalog_broker_data_model_and_destinations(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = settings_of(compose, "precedent-node", monkeypatch)
    worker = settings_of(compose, "precedent-worker", monkeypatch)
    for section in ("catalog", "storage", "model.bundle", "dicom.ae_title", "destinations"):
        first, _, key = section.partition(".")
        ours, theirs = getattr(node, first), getattr(worker, first)
        if key:
            ours, theirs = getattr(ours, key), getattr(theirs, key)
        assert ours == theirs, section
    assert (node.queue.broker_url, node.queue.name) == (worker.queue.broker_url, worker.queue.name)
    assert node.queue.serve_workers == 0, "the workers are the precedent-worker service"
    assert node.catalog.url.startswith("postgresql+psycopg://")
    assert node.metrics.port and node.metrics.bind == "0.0.0.0"  # reachable from outside the container
    assert [d.results for d in node.destinations] == [True]


def test_the_commands_are_precedent_commands_and_the_image_runs_precedent(compose: dict[str, Any]) -> None:
    assert service(compose, "precedent-node")["command"] == ["serve"]
    assert service(compose, "precedent-worker")["command"] == ["worker"]
    for name in ("precedent-node", "precedent-worker"):
        help_of(*service(compose, name)["command"])
    entrypoint = _dockerfile_instructions("ENTRYPOINT")
    assert entrypoint == ['["/opt/precedent/.venv/bin/precedent"]']


def test_ports_hosts_and_credentials_agree_between_services(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = settings_of(compose, "precedent-node", monkeypatch)
    node_ports = published(service(compose, "precedent-node")["ports"])
    assert node.dicom.port in node_ports
    assert node_ports[node.metrics.port] == "127.0.0.1:" + str(node.metrics.port)  # loopback only

    # The PACS: where results go, and the node as its modality.
    orthanc = environment(compose, "orthanc")
    [pacs] = node.destinations
    assert pacs.host == "orthanc" and pacs.port == int(orthanc["ORTHANC__DICOM_PORT"])
    assert pacs.ae_title == orthanc["ORTHANC__DICOM_AET"]
    assert pacs.port in published(service(compose, "orthanc")["ports"])
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])
    assert modalities["precedent"] == [node.dicom.ae_title, "precedent-node", node.dicom.port]

    # Redis and PostgreSQL, by service name, with the database's own user and password.
    broker = urlsplit(node.queue.broker_url)
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    catalog = urlsplit(node.catalog.url)
    postgres = environment(compose, "postgres")
    assert (catalog.hostname, catalog.port) == ("postgres", 5432)
    assert catalog.username == postgres["POSTGRES_USER"]
    assert catalog.password == postgres["POSTGRES_PASSWORD"]
    assert catalog.path == "/" + postgres["POSTGRES_DB"]


def test_node_and_workers_share_the_data_directory_and_the_bundle(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = settings_of(compose, "precedent-node", monkeypatch)
    mounts = {
        name: {
            target: source
            for source, target, *_ in (interpolate(v).split(":") for v in service(compose, name)["volumes"])
        }
        for name in ("precedent-node", "precedent-worker")
    }
    assert mounts["precedent-node"] == mounts["precedent-worker"]
    data = mounts["precedent-node"][str(node.storage.data_dir)]
    assert data in compose["volumes"], "the data directory is a named volume, shared"
    bundle = [v for v in service(compose, "precedent-node")["volumes"] if str(node.model.bundle) in v]
    assert len(bundle) == 1 and bundle[0].endswith(":ro"), "the bundle is mounted read-only"


def test_healthchecks_use_healthz_and_the_workers_wait_for_a_healthy_node(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = settings_of(compose, "precedent-node", monkeypatch)
    probe = " ".join(service(compose, "precedent-node")["healthcheck"]["test"])
    assert f"http://127.0.0.1:{node.metrics.port}/healthz" in probe
    assert "/opt/precedent/.venv/bin/python" in probe
    for name in ("redis", "postgres"):
        assert service(compose, name)["healthcheck"]["test"], name
        assert service(compose, "precedent-node")["depends_on"][name]["condition"] == "service_healthy"
    assert service(compose, "precedent-worker")["depends_on"]["precedent-node"]["condition"] == (
        "service_healthy"
    )


# --- the Dockerfile ------------------------------------------------------------------------------


def _dockerfile_instructions(name: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith(f"{name} ")]


def test_the_image_installs_what_setup_sh_installs_from_files_that_exist(compose: dict[str, Any]) -> None:
    for node_or_worker in ("precedent-node", "precedent-worker"):
        build = service(compose, node_or_worker)["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for copy in _dockerfile_instructions("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    assert any("bash deploy/setup.sh" in run for run in _dockerfile_instructions("RUN"))
    [base] = _dockerfile_instructions("FROM")
    python = re.fullmatch(r"python:(\d+\.\d+)-\S+", base)
    assert python is not None, base
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert f">={python.group(1)}" in pyproject["project"]["requires-python"]
    # The worker preloads the tcmalloc the image links to one path on every architecture.
    preload = environment(compose, "precedent-worker")["LD_PRELOAD"]
    assert any(preload in run for run in _dockerfile_instructions("RUN"))


# --- the systemd units and the pages that name them ----------------------------------------------


def test_the_units_run_real_commands_with_the_compose_files_environment(compose: dict[str, Any]) -> None:
    units = {path.name: path.read_text(encoding="utf-8") for path in (DEPLOY / "systemd").glob("*.service")}
    assert set(units) == {"precedent-node.service", "precedent-worker@.service"}
    for name, command in (("precedent-node.service", "serve"), ("precedent-worker@.service", "worker")):
        [exec_start] = re.findall(r"^ExecStart=(.+)$", units[name], re.MULTILINE)
        program, subcommand, *options = exec_start.split()
        assert program == "/opt/precedent/.venv/bin/precedent" and subcommand == command
        described = help_of(subcommand)
        assert all(option in described for option in options if option.startswith("--")), options
        assert "Environment=OMP_WAIT_POLICY=PASSIVE" in units[name]
    assert environment(compose, "precedent-worker")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "%i" in units["precedent-worker@.service"]  # one process per instance


def test_the_pages_name_only_deployment_files_that_exist() -> None:
    for page in (ROOT / "README.md", DEPLOY / "README.md", DEPLOY / "SCALING.md"):
        text = page.read_text(encoding="utf-8")
        for named in re.findall(
            r"(?:deploy/)?(systemd/[\w@.-]+\.service|compose\.yaml|Dockerfile|SCALING\.md)", text
        ):
            assert (DEPLOY / named).exists(), f"{page.name} names deploy/{named}, which does not exist"
    assert "SCALING.md" in (DEPLOY / "README.md").read_text(encoding="utf-8")
