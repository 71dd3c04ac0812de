"""`make up` with CLUSTER_WORKER_DEVICES: each worker process runs with its own WORKER_DEVICE.

Workers are the stand-in (testbed/stub_worker.py), which starts in a moment and ignores the
device, so the test runs without a GPU; what it checks is what the launcher hands each process
(read from the process's own environment) and what it says when workers share a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import launcher
from cluster.settings import ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


@pytest.fixture
def settings(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=1,
        workers=3,
        worker_devices="cuda:0,cuda:1",
        worker_module="testbed.stub_worker",
        ready_timeout=60,
    )
    try:
        yield settings
    finally:
        launcher.down(settings)


def test_workers_start_with_distinct_devices(
    settings: ClusterSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="cluster.launcher"):
        started = launcher.up(settings)
    workers = sorted(
        (record for record in started if record.name.startswith("worker-")),
        key=lambda record: record.name,
    )
    assert [record.name for record in workers] == ["worker-0", "worker-1", "worker-2"]
    assigned = [process_environment(record.pid)["WORKER_DEVICE"] for record in workers]
    assert assigned == ["cuda:0", "cuda:1", "cuda:0"]
    assert "cuda:0 is shared by 2 workers: worker-0, worker-2" in caplog.messages
    for port in settings.worker_ports():
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    # The record of the running cluster names the devices, so `make up` again is a no-op.
    assert launcher.running_settings(settings).worker_devices == "cuda:0,cuda:1"
    assert launcher.up(settings) == []
