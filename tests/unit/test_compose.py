"""docker-compose.yml: valid for Debian's docker-compose, and complete for what the code reads.

Every `GATEWAY_*` / `WORKER_*` variable the file sets must be a field of the service's settings
class (both refuse unknown ones at start-up), the settings the services cannot run without must
be set, and every placeholder of the nginx template must get a value.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from cluster.nginx_config import PLACEHOLDER, TEMPLATE_PATH
from cluster.settings import REPO_ROOT
from gateway.settings import GatewaySettings
from worker.settings import WorkerSettings

COMPOSE = REPO_ROOT / "docker-compose.yml"
WORKER_SERVICES = ("worker", *(f"worker-gpu{n}" for n in range(1, 8)), "worker-cpu")


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    return found


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, variables at their defaults)."""
    result = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "--profile", "gpus8", "--profile", "cpu",
         "config"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def _target(entry: dict[str, Any] | str) -> str:
    """The container side of a volume or port, in the long or the short syntax."""
    if isinstance(entry, dict):
        return str(entry["target"])
    return entry.split(":")[1]


def test_compose_config_is_valid() -> None:
    result = subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_service_is_there(config: dict[str, Any]) -> None:
    assert {"redis", "nginx", "gateway", *WORKER_SERVICES} <= set(config["services"])


def test_every_service_restarts_and_has_a_healthcheck(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), name


def test_redis_persists_and_evicts_only_cache_entries(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy volatile-lru" in command
    assert re.search(r"--maxmemory \d+[kmg]b", command)
    assert "/data" in {_target(volume) for volume in redis["volumes"]}
    assert "redis-data" in config["volumes"]


def test_nginx_gets_every_template_placeholder(config: dict[str, Any]) -> None:
    nginx = config["services"]["nginx"]
    placeholders = set(PLACEHOLDER.findall(TEMPLATE_PATH.read_text()))
    assert placeholders <= set(nginx["environment"])
    assert nginx["environment"]["NGINX_ENVSUBST_FILTER"] == "^TTS_"
    assert "8080" in {str(_target(port)) for port in nginx["ports"]}
    mounts = {_target(volume) for volume in nginx["volumes"]}
    assert "/etc/nginx/templates/cluster.conf.template" in mounts


def test_nginx_reresolves_scaled_services(config: dict[str, Any]) -> None:
    env = config["services"]["nginx"]["environment"]
    assert "resolver 127.0.0.11" in env["TTS_RESOLVER"]
    assert "server gateway:8000 resolve" in env["TTS_GATEWAY_SERVERS"]
    assert "server worker:8000 resolve" in env["TTS_WORKER_SERVERS"]
    # The open-source `resolve` parameter needs nginx 1.27.3 or newer.
    image = config["services"]["nginx"]["image"]
    major, minor = (int(part) for part in re.findall(r":(\d+)\.(\d+)", image)[0])
    assert (major, minor) >= (1, 28)


def _settings_env(service: dict[str, Any], prefix: str) -> set[str]:
    return {name for name in service["environment"] if name.startswith(prefix)}


def test_gateway_environment_matches_its_settings(config: dict[str, Any]) -> None:
    env = _settings_env(config["services"]["gateway"], "GATEWAY_")
    fields = {f"GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    assert env <= fields, env - fields
    required = {"GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_REDIS_URL", "GATEWAY_WORKER_URL"}
    assert required <= env
    gateway_env = config["services"]["gateway"]["environment"]
    assert gateway_env["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    assert gateway_env["GATEWAY_WORKER_URL"] == "http://nginx:8081"


def test_worker_environment_matches_its_settings(config: dict[str, Any]) -> None:
    fields = {f"WORKER_{name.upper()}" for name in WorkerSettings.model_fields}
    for name in WORKER_SERVICES:
        service = config["services"][name]
        env = _settings_env(service, "WORKER_")
        assert env <= fields, (name, env - fields)
        assert {"WORKER_HOST", "WORKER_PORT", "WORKER_ENGINE"} <= env, name
        assert service["environment"]["WORKER_PORT"] == "8000"
        assert "worker" in service["networks"]["default"]["aliases"], name


def test_gpu_workers_reserve_one_gpu_each(config: dict[str, Any]) -> None:
    seen_ids: list[str] = []
    for name in WORKER_SERVICES[:-1]:
        devices = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1, name
        seen_ids += device.get("device_ids", [])
    assert len(seen_ids) == len(set(seen_ids)) == 7


def test_ports_agree_with_the_services(config: dict[str, Any]) -> None:
    services = config["services"]
    env = services["nginx"]["environment"]
    assert env["TTS_PUBLIC_PORT"] == "8080"
    assert env["TTS_INTERNAL_PORT"] == "8081"
    assert services["gateway"]["environment"]["GATEWAY_PORT"] == "8000"
    assert set(services["gateway"]["expose"]) == {"8000"}
