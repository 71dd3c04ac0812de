"""Fixtures shared by the end-to-end tests: run directories and blocks of free ports."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.probes import port_free
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


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    """A run directory outside pytest's private (0700) tree: nginx's workers run as nobody
    when the tests run as root, and must reach their temp directory."""
    path = Path(tempfile.mkdtemp(prefix="tts-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
