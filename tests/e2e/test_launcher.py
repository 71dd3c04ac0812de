"""The launcher itself: idempotent `up`, refusal on other settings, clean failure, the CLI.

Workers are the stand-in (testbed/stub_worker.py), so clusters start in seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import launcher
from cluster.launcher import ClusterError
from cluster.settings import REPO_ROOT, ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports

STUB = "testbed.stub_worker"


def _settings(run_dir: Path, **overrides: object) -> ClusterSettings:
    values: dict[str, object] = {"worker_module": STUB, "ready_timeout": 60, **overrides}
    return cluster_on_free_ports(run_dir, gateways=1, workers=2, **values)


@pytest.fixture
def settings(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = _settings(run_dir)
    try:
        yield settings
    finally:
        launcher.down(settings)


def _cli(
    settings: ClusterSettings, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLUSTER_RUN_DIR": str(settings.run_dir), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_up_restarts_only_what_died_and_down_stops_everything(
    settings: ClusterSettings,
) -> None:
    started = launcher.up(settings)
    assert [r.name for r in started] == ["redis", "worker-0", "worker-1", "nginx", "gateway-0"]
    assert launcher.up(settings) == []
    launcher.down(settings)
    assert not any(record.alive() for record in started)
    assert not list(settings.pid_dir.glob("*.pid"))


def test_other_settings_are_refused_while_running(settings: ClusterSettings) -> None:
    launcher.up(settings)
    other = settings.model_copy(update={"workers": 3})
    with pytest.raises(ClusterError, match="other settings"):
        launcher.up(other)
    assert all(row.alive for row in launcher.status(settings))


def test_a_busy_port_stops_the_start_before_anything_runs(run_dir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        settings = _settings(run_dir, public_port=blocker.getsockname()[1])
        with pytest.raises(ClusterError, match="in use"):
            launcher.up(settings)
    assert not launcher.load_records(settings)


def test_a_service_that_dies_at_start_up_stops_the_rest(run_dir: Path) -> None:
    settings = _settings(run_dir, worker_module="tests.e2e.no_such_module")
    with pytest.raises(ClusterError, match="exited during start-up"):
        launcher.up(settings)
    records = launcher.load_records(settings)
    assert not [name for name, record in records.items() if record.alive()]
    launcher.down(settings)


def test_cli_up_status_logs_down(settings: ClusterSettings) -> None:
    env = {
        "CLUSTER_WORKER_MODULE": STUB,
        "CLUSTER_WORKERS": "1",
        "CLUSTER_PUBLIC_PORT": str(settings.public_port),
        "CLUSTER_H2C_PORT": str(settings.h2c_port),
        "CLUSTER_INTERNAL_PORT": str(settings.internal_port),
        "CLUSTER_GATEWAY_BASE_PORT": str(settings.gateway_base_port),
        "CLUSTER_WORKER_BASE_PORT": str(settings.worker_base_port),
        "CLUSTER_REDIS_PORT": str(settings.redis_port),
    }
    up = _cli(settings, "up", extra_env=env)
    assert up.returncode == 0, up.stderr
    assert f"http://127.0.0.1:{settings.public_port}" in up.stdout
    assert "-o hello.wav" in up.stdout
    assert "already running" in _cli(settings, "up", extra_env=env).stdout
    status = _cli(settings, "status", extra_env=env).stdout
    assert status.count("ready") == 4, status
    assert httpx.get(f"http://127.0.0.1:{settings.public_port}/healthz").status_code == 200
    assert "==> " in _cli(settings, "logs", "--lines", "2", extra_env=env).stdout
    down = _cli(settings, "down", extra_env=env)
    assert down.returncode == 0
    assert "stopped: nginx, gateway-0, worker-0, redis" in down.stdout
    assert "no cluster is running" in _cli(settings, "status", extra_env=env).stdout
