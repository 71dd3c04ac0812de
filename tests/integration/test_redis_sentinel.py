"""The gateway behind Redis Sentinel (GATEWAY_REDIS_SENTINELS) follows a failover by itself.

Debian's redis-server runs a master, a replica of it and a sentinel (`--sentinel`) on free
loopback ports; the worker is a real Piper worker. The master is killed: the sentinel promotes
the replica, the gateway keeps serving (uncached while there is no master), finds the new
master through the sentinel, and the entry cached before the failover is a hit again.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

from tests.support.audio import decode
from tests.support.processes import (
    RunningProcess,
    free_port,
    python_service,
    redis_ping,
    redis_server,
    redis_server_binary,
    wait_until_ready,
)

MASTER = "tts"


@contextmanager
def redis_process(argv: list[str], port: int, log_path: Path) -> Iterator[RunningProcess]:
    log_path.touch()
    process = subprocess.Popen(
        [redis_server_binary(), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    running = RunningProcess(process=process, port=port, log_path=log_path)
    try:
        wait_until_ready(lambda: redis_ping(port), process, log_path, 20.0)
        yield running
    finally:
        running.stop()


def replica_of(master: int, root: Path) -> tuple[list[str], int]:
    port = free_port()
    root.mkdir(parents=True)
    argv = [
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
        "--replicaof", "127.0.0.1", str(master),
        "--appendonly", "yes", "--save", "",
        "--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru",
        "--logfile", str(root / "redis.log"),
    ]
    return argv, port


def sentinel_of(master: int, root: Path) -> tuple[list[str], int]:
    port = free_port()
    root.mkdir(parents=True)
    config = root / "sentinel.conf"
    config.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {root}",
                f"logfile {root / 'sentinel.log'}",
                f"sentinel monitor {MASTER} 127.0.0.1 {master} 1",
                f"sentinel down-after-milliseconds {MASTER} 1000",
                f"sentinel failover-timeout {MASTER} 10000",
                "",
            ]
        )
    )
    return [str(config), "--sentinel"], port


def master_port(sentinel: int) -> int | None:
    try:
        address = redis.Redis(port=sentinel).sentinel_get_master_addr_by_name(MASTER)
    except redis.RedisError:
        return None
    return int(address[1]) if isinstance(address, tuple) else None


def replicas_known(sentinel: int) -> bool:
    try:
        return bool(redis.Redis(port=sentinel).sentinel_slaves(MASTER))
    except redis.RedisError:
        return False


def speech(client: httpx.Client, text: str) -> httpx.Response:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}
    response = client.post("/v1/audio/speech", json=body, timeout=120)
    assert response.status_code == 200, response.text
    decoded = decode(response.content, "wav", 22050)
    assert decoded.duration >= 0.15 * len(text.split())
    assert decoded.rms > 0.01, "silence"
    return response


def wait_for_hit(client: httpx.Client, text: str, what: str) -> None:
    deadline = time.monotonic() + 40
    while speech(client, text).headers["X-Cache"] != "HIT":
        assert time.monotonic() < deadline, what


def test_a_failover_is_followed_and_loses_nothing(tmp_path: Path) -> None:
    before, after = "Cached before the failover.", "Cached after the failover."
    with redis_server(tmp_path / "master") as master:
        replica_argv, replica = replica_of(master.port, tmp_path / "replica")
        with redis_process(replica_argv, replica, tmp_path / "replica" / "redis.log"):
            link = redis.Redis(port=replica)
            wait_until_ready(
                lambda: link.info("replication")["master_link_status"] == "up",
                master.process,
                master.log_path,
                20.0,
            )
            sentinel_argv, sentinel = sentinel_of(master.port, tmp_path / "sentinel")
            with redis_process(
                sentinel_argv, sentinel, tmp_path / "sentinel" / "sentinel.log"
            ) as watcher:
                wait_until_ready(
                    lambda: master_port(sentinel) == master.port and replicas_known(sentinel),
                    watcher.process,
                    watcher.log_path,
                    30.0,
                )
                worker_port, gateway_port = free_port(), free_port()
                with python_service(
                    "worker",
                    {"WORKER_PORT": str(worker_port), "WORKER_THREADS": "1"},
                    port=worker_port,
                    log_dir=tmp_path,
                    timeout=180.0,
                ) as worker, python_service(
                    "gateway",
                    {
                        "GATEWAY_PORT": str(gateway_port),
                        # Only the db number counts; the sentinel says where the master is.
                        "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0",
                        "GATEWAY_REDIS_SENTINELS": f"127.0.0.1:{sentinel}",
                        "GATEWAY_REDIS_SENTINEL_MASTER": MASTER,
                        "GATEWAY_WORKER_URL": worker.url,
                    },
                    port=gateway_port,
                    log_dir=tmp_path,
                ) as gateway, httpx.Client(base_url=gateway.url) as client:
                    assert speech(client, before).headers["X-Cache"] == "MISS"
                    assert speech(client, before).headers["X-Cache"] == "HIT"
                    # The entry has reached the replica before the master dies.
                    assert redis.Redis(port=master.port).wait(1, 5000) == 1
                    master.stop(signal.SIGKILL)
                    response = speech(client, after)
                    assert response.headers["X-Cache"] == "MISS"
                    wait_until_ready(
                        lambda: master_port(sentinel) == replica,
                        watcher.process,
                        watcher.log_path,
                        30.0,
                    )
                    wait_for_hit(client, before, "the entry written before the failover is lost")
                    wait_for_hit(client, after, "caching did not resume on the new master")
