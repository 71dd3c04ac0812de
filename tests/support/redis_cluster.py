"""A real Redis Cluster from Debian's redis-server: masters on free loopback ports, no replicas."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from testbed.processes import start_redis
from tests.support.processes import (
    RunningProcess,
    free_port,
    wait_until_ready,
)

# A node also listens on its cluster bus, port + 10000.
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port is free too."""
    while True:
        port = free_port()
        if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port


def redis_cli() -> str:
    found = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not Path(found).exists():
        raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
    return found


def cli(port: int, *args: str) -> str:
    result = subprocess.run(
        [redis_cli(), "-p", str(port), *args], capture_output=True, text=True, timeout=10
    )
    return result.stdout


def cluster_ok(port: int) -> bool:
    return "cluster_state:ok" in cli(port, "cluster", "info")


@dataclass
class ClusterNode:
    """One master; `stop()` and `start()` keep its port, node id, slots and append-only file."""

    port: int
    data_dir: Path
    process: RunningProcess | None = None

    def start(self) -> None:
        self.process = start_redis(
            self.data_dir, self.port,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            # A cache keeps serving the slots it has while another node is away.
            "--cluster-require-full-coverage", "no",
            maxmemory="64mb",
        )

    def pause(self) -> None:
        """SIGSTOP: the node hangs; connections open, nothing answers."""
        assert self.process is not None
        self.process.process.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        """SIGTERM (after SIGCONT): Redis writes its append-only file out and exits."""
        if self.process is not None:
            self.process.process.send_signal(signal.SIGCONT)
            self.process.stop()
            self.process = None


@contextmanager
def redis_cluster(root: Path, masters: int = 3) -> Iterator[list[ClusterNode]]:
    """Start `masters` nodes, join them with `redis-cli --cluster create`, wait for state ok."""
    nodes = []
    try:
        for _ in range(masters):
            port = cluster_port()
            node = ClusterNode(port=port, data_dir=root / f"node-{port}")
            node.data_dir.mkdir(parents=True)
            nodes.append(node)
            node.start()
        created = subprocess.run(
            [
                redis_cli(), "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for node in nodes:
            assert node.process is not None
            wait_until_ready(
                lambda node=node: cluster_ok(node.port),
                node.process.process,
                node.process.log_path,
                30.0,
            )
        yield nodes
    finally:
        for node in nodes:
            with suppress(Exception):
                node.stop()
