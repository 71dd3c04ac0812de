"""One worker per GPU: the launcher's device rule, its rendering, and docker-compose's profiles."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from cluster import devices, services
from cluster.settings import REPO_ROOT, ClusterSettings


def test_a_device_list_is_given_to_the_workers_in_turn() -> None:
    listed = devices.parse_devices(" cuda:0, cuda:1 ")
    assert listed == ["cuda:0", "cuda:1"]
    assert devices.assign(2, listed) == ["cuda:0", "cuda:1"]
    assert devices.assign(5, listed) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert devices.assign(3, []) == [None, None, None]
    assert devices.parse_devices("") == []


def test_auto_is_one_device_per_visible_gpu() -> None:
    assert devices.parse_devices("auto", gpu_count=4) == [f"cuda:{i}" for i in range(4)]
    with pytest.raises(ValueError, match="no GPU is visible"):
        devices.parse_devices("AUTO", gpu_count=0)


@pytest.mark.parametrize("spec", ["gpu0", "cuda:", "cuda:0,,cuda:1", "cuda:x"])
def test_what_is_not_a_device_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="not devices"):
        devices.parse_devices(spec)


def test_shared_and_idle_devices_are_named() -> None:
    shared = devices.assign(3, ["cuda:0", "cuda:1"])
    assert devices.describe(shared, ["cuda:0", "cuda:1"]) == [
        "cuda:0 is shared by 2 workers: worker-0, worker-2"
    ]
    one_each = devices.assign(2, ["cuda:0", "cuda:1"])
    assert devices.describe(one_each, ["cuda:0", "cuda:1"]) == []
    assert devices.describe(devices.assign(1, ["cuda:0", "cuda:1"]), ["cuda:0", "cuda:1"]) == [
        "no worker runs on cuda:1"
    ]
    assert devices.describe(devices.assign(2, ["cpu"]), ["cpu"]) == []


def test_settings_resolve_auto_to_an_explicit_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "visible_gpus", lambda: 3)
    settings = ClusterSettings(workers="auto")  # type: ignore[arg-type]
    assert settings.workers == 3
    assert settings.worker_devices == "cuda:0,cuda:1,cuda:2"
    assert ClusterSettings(workers=4, worker_devices="auto").worker_assignment() == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:0"
    ]
    monkeypatch.setenv("CLUSTER_WORKERS", "auto")
    monkeypatch.setenv("CLUSTER_WORKER_DEVICES", "cuda:1,cuda:0")
    from_env = ClusterSettings()
    assert (from_env.workers, from_env.worker_assignment()) == (2, ["cuda:1", "cuda:0"])
    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    monkeypatch.delenv("CLUSTER_WORKER_DEVICES")
    with pytest.raises(ValidationError, match="no GPU is visible"):
        ClusterSettings()


def _worker_env(settings: ClusterSettings) -> list[dict[str, str]]:
    return [svc.env for svc in services.plan(settings) if svc.name.startswith("worker-")]


def test_each_worker_gets_its_own_worker_device() -> None:
    envs = _worker_env(ClusterSettings(workers=3, worker_devices="cuda:0,cuda:1"))
    assert [env["WORKER_DEVICE"] for env in envs] == ["cuda:0", "cuda:1", "cuda:0"]
    assert all("WORKER_DEVICE" not in env for env in _worker_env(ClusterSettings(workers=2)))


def _compose_gpu(service: dict[str, Any]) -> int:
    """The GPU a compose worker reserves: its one device id, or GPU 0 for `count: 1` (Docker
    hands `count: N` the first N GPUs)."""
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    if "device_ids" in device:
        (gpu,) = device["device_ids"]
        return int(gpu)
    assert device["count"] == 1
    return 0


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_compose_profiles_pin_workers_as_the_launcher_does(gpus: int) -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    profile = f"gpus{gpus}"
    workers = [
        service
        for service in compose["services"].values()
        if "worker" in service.get("networks", {}).get("default", {}).get("aliases", [])
        and service.get("environment", {}).get("WORKER_ENGINE") == "cosyvoice"
        and (not service.get("profiles") or profile in service["profiles"])
    ]
    compose_gpus = sorted(_compose_gpu(service) for service in workers)
    launcher = devices.assign(gpus, devices.parse_devices("auto", gpu_count=gpus))
    assert compose_gpus == [int(str(device).split(":")[1]) for device in launcher]
    # Inside a container only its reserved GPU is visible, so `cuda` is that GPU.
    assert {service["environment"]["WORKER_DEVICE"] for service in workers} == {"cuda"}
