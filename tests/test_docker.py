"""The docker/ files, checked by reading them (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_reference_each_other_consistently():
    services = _compose()["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), f"{name} depends on an unknown service"
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), mount


def test_compose_publishes_ports_on_loopback_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_compose_ray_nodes_use_token_auth_and_shared_storage():
    services = _compose()["services"]
    for name in ("ray-head", "ray-worker", "mlflow"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["MATE_SWEEP_STORAGE"].startswith("/shared/")
        assert "shared:/shared" in services[name]["volumes"]
    assert "--head" in services["ray-head"]["command"]
    assert "--address ray-head:6379" in services["ray-worker"]["command"]


def test_compose_environment_names_match_cli_options():
    env = _compose()["services"]["ray-head"]["environment"]
    launch = main.commands["launch"]
    envvars = {opt.envvar for opt in launch.params if opt.envvar}
    assert {"MLFLOW_TRACKING_URI", "MATE_STUDY_STORAGE", "MATE_SWEEP_STORAGE"} <= envvars
    assert {"MLFLOW_TRACKING_URI", "MATE_STUDY_STORAGE", "MATE_SWEEP_STORAGE"} <= set(env)


def test_dockerfile_copies_only_existing_paths():
    copies = re.findall(r"^COPY (.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    sources = [src for line in copies for src in line.split()]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
