"""The process helpers the tests share with the benchmarks; they live in `testbed.processes`."""

from __future__ import annotations

from testbed.processes import (
    REPO_ROOT,
    RunningProcess,
    free_port,
    http_ok,
    python_service,
    redis_ping,
    redis_server,
    redis_server_binary,
    wait_until_ready,
)

__all__ = [
    "REPO_ROOT",
    "RunningProcess",
    "free_port",
    "http_ok",
    "python_service",
    "redis_ping",
    "redis_server",
    "redis_server_binary",
    "wait_until_ready",
]
