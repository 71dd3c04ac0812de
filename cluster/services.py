"""What a local cluster runs: one entry per process, in start order, with its readiness probe."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cluster import monitor, nginx_config, probes
from cluster.settings import ClusterSettings


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    port: int
    # Every (host, port) the process binds; each must be free before it starts.
    binds: list[tuple[str, int]]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)


def redis_binary() -> str:
    for candidate in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/sbin"):
        path = Path(candidate) / "redis-server"
        if path.exists():
            return str(path)
    raise RuntimeError("redis-server is not installed (as root: apt-get install redis-server)")


def redis_config(settings: ClusterSettings) -> str:
    """Redis for the audio cache and voices: evict only keys with a TTL; persist with an AOF."""
    data_dir = settings.run_dir / "redis"
    return "\n".join(
        [
            f"port {settings.redis_port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            f"dir {data_dir}",
            f"logfile {settings.log_dir / 'redis.log'}",
            f"maxmemory {settings.redis_maxmemory}",
            "maxmemory-policy volatile-lru",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "",
        ]
    )


def plan(settings: ClusterSettings) -> list[Service]:
    """Every process of the cluster, in start order: Redis, workers, nginx, gateways, and
    the Redis exporter and Prometheus when `settings.monitor` is on."""
    python = sys.executable
    worker_threads = _worker_threads(settings.workers)
    redis_conf = settings.run_dir / "redis" / "redis.conf"
    services = [
        Service(
            name="redis",
            argv=[redis_binary(), str(redis_conf)],
            port=settings.redis_port,
            binds=[("127.0.0.1", settings.redis_port)],
            ready=partial(probes.redis_ready, settings.redis_port),
        )
    ]
    assignment = settings.worker_assignment()
    for index, port in enumerate(settings.worker_ports()):
        device = assignment[index]
        services.append(
            Service(
                name=f"worker-{index}",
                argv=[python, "-m", settings.worker_module],
                port=port,
                binds=[("127.0.0.1", port)],
                ready=partial(probes.http_ready, f"http://127.0.0.1:{port}/readyz"),
                env={
                    "WORKER_HOST": "127.0.0.1",
                    "WORKER_PORT": str(port),
                    "WORKER_ENGINE": settings.engine,
                    **worker_threads,
                    **({"WORKER_DEVICE": device} if device is not None else {}),
                },
            )
        )
    nginx_paths = nginx_config.paths_for(settings)
    services.append(
        Service(
            name="nginx",
            argv=nginx_config.nginx_command(nginx_paths),
            port=settings.public_port,
            binds=nginx_binds(settings),
            ready=partial(probes.http_ready, f"{settings.public_url}/healthz"),
        )
    )
    for index, port in enumerate(settings.gateway_ports()):
        services.append(
            Service(
                name=f"gateway-{index}",
                argv=[python, "-m", "gateway"],
                port=port,
                binds=[("127.0.0.1", port)],
                ready=partial(probes.http_ready, f"http://127.0.0.1:{port}/readyz"),
                env={
                    "GATEWAY_HOST": "127.0.0.1",
                    "GATEWAY_PORT": str(port),
                    "GATEWAY_REDIS_URL": settings.redis_url,
                    "GATEWAY_WORKER_URL": settings.internal_url,
                },
            )
        )
    if settings.monitor:
        services.append(
            Service(
                name="redis-exporter",
                argv=monitor.redis_exporter_command(settings),
                port=settings.redis_exporter_port,
                binds=[("127.0.0.1", settings.redis_exporter_port)],
                ready=partial(
                    probes.http_ready, f"http://127.0.0.1:{settings.redis_exporter_port}/metrics"
                ),
            )
        )
        services.append(
            Service(
                name="prometheus",
                argv=monitor.prometheus_command(settings),
                port=settings.prometheus_port,
                binds=[("127.0.0.1", settings.prometheus_port)],
                ready=partial(probes.http_ready, f"{settings.prometheus_url}/-/ready"),
            )
        )
    return services


def _worker_threads(workers: int) -> dict[str, str]:
    """Split this machine's cores between the workers, unless WORKER_THREADS is set already."""
    if "WORKER_THREADS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0))
    return {"WORKER_THREADS": str(max(1, cores // workers))}


def nginx_binds(settings: ClusterSettings) -> list[tuple[str, int]]:
    binds = [
        (settings.public_host, settings.public_port),
        ("127.0.0.1", settings.internal_port),
    ]
    version = nginx_config.nginx_version(nginx_config.nginx_binary())
    if version < nginx_config.HTTP2_DIRECTIVE_SINCE:
        binds.append((settings.public_host, settings.h2c_port))
    return binds


def write_redis_config(settings: ClusterSettings) -> None:
    data_dir = settings.run_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "redis.conf").write_text(redis_config(settings))
