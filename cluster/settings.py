"""Settings of the local cluster that `make up` starts: counts, ports, limits and paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster import devices

REPO_ROOT = Path(__file__).resolve().parents[1]


class ClusterSettings(BaseSettings):
    """One local cluster. Read from `CLUSTER_*` variables; the CLI's flags override them.

    Port ranges: gateway i listens on `gateway_base_port + i`, worker i on `worker_base_port + i`.
    """

    model_config = SettingsConfigDict(env_prefix="CLUSTER_", extra="forbid", frozen=True)

    # Where pid files, logs, rendered configs and Redis data live.
    run_dir: Path = REPO_ROOT / "run"
    # Number of gateways behind nginx's public listener.
    gateways: int = Field(default=1, ge=1, le=64)
    # Number of workers behind nginx's internal listener; `auto`: one per worker device.
    workers: int = Field(default=2, ge=1, le=64)
    # Devices the workers run on, given to worker i in turn as WORKER_DEVICE (`cuda:0,cuda:1`),
    # or `auto`: one per visible GPU. Empty: every worker gets WORKER_DEVICE as set.
    worker_devices: str = ""
    # Engine every worker loads (WORKER_ENGINE).
    engine: str = "piper"
    # Python module each worker runs (`python -m ...`); benchmarks swap in a stand-in.
    worker_module: str = "worker"
    # Address the public listener binds; 0.0.0.0 exposes it beyond this machine.
    public_host: str = "127.0.0.1"
    # Public listener (HTTP/1.1; also h2c when nginx is 1.25.1 or newer).
    public_port: int = Field(default=8080, ge=1, le=65535)
    # Separate prior-knowledge h2c listener, used only with nginx older than 1.25.1.
    h2c_port: int = Field(default=8082, ge=1, le=65535)
    # Internal listener that balances workers (always bound to 127.0.0.1).
    internal_port: int = Field(default=8081, ge=1, le=65535)
    # First gateway port.
    gateway_base_port: int = Field(default=9000, ge=1, le=65535)
    # First worker port.
    worker_base_port: int = Field(default=9100, ge=1, le=65535)
    # Redis port (its own instance, own config; never the system one).
    redis_port: int = Field(default=6380, ge=1, le=65535)
    # Redis memory cap; cached audio (with TTLs) is evicted first under volatile-lru.
    redis_maxmemory: str = "256mb"
    # nginx limit_req rate per client address on the public listener.
    rate_per_addr: str = Field(default="50r/s", pattern=r"^\d+r/[sm]$")
    # Burst allowed above that rate before 429.
    burst_per_addr: int = Field(default=100, ge=0)
    # nginx limit_req rate per API key (Bearer token) on the public listener.
    rate_per_key: str = Field(default="50r/s", pattern=r"^\d+r/[sm]$")
    # Burst allowed per key.
    burst_per_key: int = Field(default=100, ge=0)
    # Largest request body nginx accepts (prompt uploads); larger gets 413.
    max_body: str = Field(default="16m", pattern=r"^\d+[km]?$")
    # nginx read timeout between two reads from a gateway (public listener).
    read_timeout: str = Field(default="300s", pattern=r"^\d+(ms|s|m)$")
    # nginx read timeout between two reads from a worker (internal listener): longer than a
    # worker's queue wait (WORKER_QUEUE_TIMEOUT_S), shorter than the gateway's read timeout.
    worker_read_timeout: str = Field(default="30s", pattern=r"^\d+(ms|s|m)$")
    # nginx worker processes.
    nginx_worker_processes: str = "auto"
    # Seconds to wait for every service to be ready.
    ready_timeout: float = Field(default=240.0, gt=0)
    # Also start Prometheus (Debian's `prometheus`), scraping every gateway and worker with
    # the rules of deploy/prometheus (`make up MONITOR=1`).
    monitor: bool = False
    # Prometheus' port (bound to 127.0.0.1), when `monitor` is on.
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    # How often Prometheus scrapes and evaluates its rules.
    prometheus_scrape_interval: str = Field(default="5s", pattern=r"^\d+(ms|s|m)$")
    # Port of the Redis exporter (Debian's prometheus-redis-exporter), when `monitor` is on.
    redis_exporter_port: int = Field(default=9121, ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _workers_auto(cls, data: Any) -> Any:
        """`workers=auto`: one worker per device (per visible GPU when none are listed)."""
        if isinstance(data, dict) and str(data.get("workers", "")).strip().lower() == "auto":
            listed = devices.parse_devices(str(data.get("worker_devices") or devices.AUTO))
            data = {**data, "workers": len(listed), "worker_devices": ",".join(listed)}
        return data

    @field_validator("worker_devices")
    @classmethod
    def _explicit_devices(cls, value: str) -> str:
        """Stored as the explicit list (`auto` resolved), so a running cluster's record says
        which device each worker has."""
        return ",".join(devices.parse_devices(value))

    def worker_device_list(self) -> list[str]:
        return devices.parse_devices(self.worker_devices)

    def worker_assignment(self) -> list[str | None]:
        """WORKER_DEVICE of worker i, or None where the environment's applies."""
        return devices.assign(self.workers, self.worker_device_list())

    @property
    def pid_dir(self) -> Path:
        return self.run_dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.public_host in ("0.0.0.0", "") else self.public_host
        return f"http://{host}:{self.public_port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def gateway_ports(self) -> list[int]:
        return [self.gateway_base_port + i for i in range(self.gateways)]

    def worker_ports(self) -> list[int]:
        return [self.worker_base_port + i for i in range(self.workers)]
