"""Start real processes (Hypercorn services, Redis) on free loopback ports; wait on readiness.

Shared by the tests and the benchmarks (which must not import `tests`).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


LISTEN_PORTS = range(20000, 32768)
"""Where services started here listen: below Linux's ephemeral range (32768-60999 by default),
so no outgoing connection is given the port between choosing it and the service binding it."""


def free_port() -> int:
    """A loopback port nothing listens on, drawn at random from `LISTEN_PORTS`."""
    for _ in range(1000):
        port = random.choice(LISTEN_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {LISTEN_PORTS}")


@dataclass
class RunningProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def wait_until_ready(
    check: object, process: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> None:
    """Poll `check()` until it returns True; fail early if the process dies."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not ready after {timeout} s:\n{log_path.read_text(errors='replace')}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def python_service(
    module: str,
    env: Mapping[str, str],
    *,
    port: int,
    log_dir: Path,
    ready_path: str = "/readyz",
    timeout: float = 60.0,
) -> Iterator[RunningProcess]:
    """Run `python -m module` with `env` added, until `ready_path` answers 200."""
    log_path = log_dir / f"{module}-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = RunningProcess(process=process, port=port, log_path=log_path)
    try:
        wait_until_ready(
            lambda: http_ok(f"{running.url}{ready_path}"), process, log_path, timeout
        )
        yield running
    finally:
        if process.poll() is None:
            # A stopped (SIGSTOP) process must be continued to see SIGTERM.
            process.send_signal(signal.SIGCONT)
        running.stop()


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(found).exists():
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return found


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    data_dir: Path, port: int, *options: str, maxmemory: str = "256mb"
) -> RunningProcess:
    """A redis-server with the cluster's policy (volatile-lru, appendonly, no snapshots) and
    any further `options`, returned once it answers PING; the caller stops it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"redis-{port}.log"
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            *options,
            "--appendonly", "yes",
            "--save", "",
            "--maxmemory", maxmemory,
            "--maxmemory-policy", "volatile-lru",
            "--logfile", str(log_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    log_path.touch()
    running = RunningProcess(process=process, port=port, log_path=log_path)
    try:
        wait_until_ready(lambda: redis_ping(port), process, log_path, 20.0)
    except BaseException:
        running.stop()
        raise
    return running


@contextmanager
def redis_server(data_dir: Path, port: int | None = None) -> Iterator[RunningProcess]:
    """A real redis-server with the cluster's policy: volatile-lru, appendonly, no snapshots."""
    running = start_redis(data_dir, port or free_port())
    try:
        yield running
    finally:
        running.stop()
