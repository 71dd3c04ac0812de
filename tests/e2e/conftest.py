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


def free_port_block(count: int, taken: frozenset[int] = frozenset()) -> int:
    """The first of `count` consecutive free loopback ports (the launcher numbers ports so),
    none of them in `taken`."""
    for _ in range(200):
        first = free_port()
        block = range(first, first + count)
        if first + count < 65536 and not taken.intersection(block) and all(
            port_free("127.0.0.1", port) for port in block
        ):
            return first
    raise RuntimeError(f"no block of {count} free ports found")


def cluster_on_free_ports(
    run_dir: Path, *, gateways: int, workers: int, **overrides: object
) -> ClusterSettings:
    """Settings for a cluster whose every listener is on its own free loopback port (a port
    free when drawn is free again for the next draw, so each draw skips those already given,
    `overrides`' own ports included)."""
    taken = {v for k, v in overrides.items() if k.endswith("_port") and isinstance(v, int)}

    def block(count: int) -> int:
        first = free_port_block(count, frozenset(taken))
        taken.update(range(first, first + count))
        return first

    values: dict[str, object] = {
        "run_dir": run_dir,
        "gateways": gateways,
        "workers": workers,
        "public_port": block(1),
        "h2c_port": block(1),
        "internal_port": block(1),
        "gateway_base_port": block(gateways),
        "worker_base_port": block(workers),
        "redis_port": block(1),
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
