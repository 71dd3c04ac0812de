"""Fixtures shared by the end-to-end tests: run directories, free ports, cluster settings."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.probes import port_free
from cluster.settings import ClusterSettings
from tests.support.processes import free_port


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free loopback ports (the launcher numbers ports so)."""
    for _ in range(200):
        first = free_port()
        if first + count < 65536 and all(
            port_free("127.0.0.1", first + offset) for offset in range(count)
        ):
            return first
    raise RuntimeError(f"no block of {count} free ports found")


def cluster_on_free_ports(
    run_dir: Path, *, gateways: int, workers: int, **overrides: object
) -> ClusterSettings:
    """Settings for a cluster whose every listener is on a free loopback port."""
    values: dict[str, object] = {
        "run_dir": run_dir,
        "gateways": gateways,
        "workers": workers,
        "public_port": free_port(),
        "h2c_port": free_port(),
        "internal_port": free_port(),
        "gateway_base_port": free_port_block(gateways),
        "worker_base_port": free_port_block(workers),
        "redis_port": free_port(),
        "nginx_worker_processes": "1",
        **overrides,
    }
    return ClusterSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    """A run directory outside pytest's private (0700) tree: nginx's workers run as nobody
    when the tests run as root, and must reach their temp directory."""
    path = Path(tempfile.mkdtemp(prefix="tts-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
