"""The docker/ files, checked by reading them (no Docker engine runs here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _url_password(value: str) -> str | None:
    """The password written in a URL value, if it has one."""
    if "://" not in value or "@" not in value:
        return None
    userinfo = value.split("://", 1)[1].rsplit("@", 1)[0]
    return userinfo.partition(":")[2] or None


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


def test_compose_takes_every_secret_from_the_uncommitted_env_file():
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"}
    example = (DOCKER / "example.env").read_text()
    assert set(re.findall(r"^(\w+)=", example, re.MULTILINE)) == required
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "TOKEN" in key:
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
            password = _url_password(str(value))
            assert password is None or password.startswith("${"), f"{name}: {key} has one"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env would be committed"


def test_compose_mlflow_server_allows_only_its_own_host_names():
    command = " ".join(_compose()["services"]["mlflow"]["command"].split())
    hosts = re.search(r"--allowed-hosts (\S+)", command).group(1).split(",")
    assert {"mlflow", "mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= set(hosts)
    assert "*" not in hosts
    origins = re.search(r"--cors-allowed-origins (\S+)", command).group(1).split(",")
    assert origins == ["http://localhost:5000", "http://127.0.0.1:5000"]
    # The backend URL holds the database password: environment, not argv (`ps` shows argv).
    assert "--backend-store-uri" not in command
    backend = _compose()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://mate:${POSTGRES_PASSWORD")
