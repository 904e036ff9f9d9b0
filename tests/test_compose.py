"""docker-compose.yml: the services, ports, commands and environment the README promises.

Parsed with PyYAML (anchors resolved), so no Docker is needed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from backend.jobs import QUEUE_NAME as QUEUE  # the queue the backend enqueues on

COMPOSE_FILE = Path(__file__).resolve().parents[1] / "docker-compose.yml"

# Settings the backend and the worker must receive (names read by backend/config.py).
BACKEND_ENV = (
    "LABEL_STUDIO_URL",
    "LABEL_STUDIO_API_KEY",
    "REDIS_URL",
    "MODEL_DIR",
    "CLIP_MODEL",
    "DETECTOR",
    "DETECTOR_WEIGHTS",
)


def services_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services() -> dict:
    return services_file()["services"]


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def _container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        target = port["target"] if isinstance(port, dict) else str(port).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def test_services(services):
    assert set(services) == {"label-studio", "backend", "worker", "redis"}


def test_label_studio(services):
    ls = services["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    assert 8080 in _container_ports(ls)
    env = _env(ls)
    # Label Studio reaches the backend on the compose network, its SSRF guard on for everything else: every
    # default banned range stays banned (tests/e2e/test_ssrf_guard.py checks the mechanism on a real one).
    import ipaddress

    from e2e.test_ssrf_guard import DEFAULT_BANNED

    assert str(env["ML_BLOCK_LOCAL_IP"]).lower() == "false"
    assert str(env["SSRF_PROTECTION_ENABLED"]).lower() == "true"
    assert str(env["USE_DEFAULT_BANNED_SUBNETS"]).lower() == "false"
    banned = [ipaddress.ip_network(n) for n in env["USER_ADDITIONAL_BANNED_SUBNETS"].split(",")]
    network = ipaddress.ip_network(services_file()["networks"]["default"]["ipam"]["config"][0]["subnet"])
    assert not any(network.overlaps(n) for n in banned)
    for default in map(ipaddress.ip_network, DEFAULT_BANNED):   # all of it banned, but the compose network
        left = [default] if not default.overlaps(network) or default.version != network.version else list(
            default.address_exclude(network))
        assert all(any(part.subnet_of(n) for n in banned if n.version == part.version) for part in left), default
    assert any(str(v).endswith(":/label-studio/data") for v in ls["volumes"])


def test_backend(services):
    backend = services["backend"]
    assert "build" in backend
    assert 9090 in _container_ports(backend)
    command = _command(backend)
    assert command[:4] == ["python", "-m", "backend", "serve"]   # waitress: slow clients cannot starve /health
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "9090"
    assert any(str(v).endswith(":/models") for v in backend["volumes"])


def test_worker(services):
    worker, backend = services["worker"], services["backend"]
    assert worker["image"] == backend["image"]
    shell = _command(worker)
    assert shell[:2] == ["sh", "-c"]
    download, worker_command = shell[2].split(" && exec ")
    assert download == "python -m backend download"   # the weights first (a lock makes one download wait)
    command = shlex.split(worker_command)
    assert command[:2] == ["rq", "worker"]
    assert command[-1] == QUEUE
    assert command[command.index("--url") + 1] == "redis://:${REDIS_PASSWORD}@redis:6379/0"
    assert command[command.index("--worker-class") + 1] == "rq.worker.SimpleWorker"   # models stay loaded
    assert command[command.index("--serializer") + 1] == "rq.serializers.JSONSerializer"   # never unpickles


def test_redis(services):
    assert services["redis"]["image"].startswith("redis:7")
    command = _command(services["redis"])
    assert command[command.index("--requirepass") + 1] == "${REDIS_PASSWORD}"
    assert command[command.index("--appendonly") + 1] == "yes"   # learned memory survives a crash


@pytest.mark.parametrize("service", ["backend", "worker"])
def test_backend_environment(services, service):
    env = _env(services[service])
    missing = [name for name in BACKEND_ENV if name not in env]
    assert not missing, f"{service} lacks {missing}"
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert env["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?") and env["REDIS_URL"].endswith("@redis:6379/0")
    assert env["MODEL_DIR"] == "/models"
    # Secrets come from the caller's environment, never from the file.
    assert env["LABEL_STUDIO_API_KEY"].startswith("${LABEL_STUDIO_API_KEY")


def test_the_image_can_bake_the_weights_in():
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert "ARG PRELOAD_MODELS=0" in dockerfile
    assert 'if [ "$PRELOAD_MODELS" = "1" ]; then PROFILE="$PROFILE" python -m backend download; fi' in dockerfile
