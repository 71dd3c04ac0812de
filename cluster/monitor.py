"""Prometheus beside the local cluster (`make up MONITOR=1`): its configuration and command.

The configuration is deploy/prometheus/prometheus.yml with this cluster's real targets (every
gateway and worker port, Redis through Debian's `prometheus-redis-exporter`, and Prometheus
itself) and the rule files by absolute path, written
to `run/prometheus/prometheus.yml`; its data lives in `run/prometheus/data`. It runs Debian's
`prometheus`, bound to 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from cluster.settings import REPO_ROOT, ClusterSettings

DEPLOY_DIR = REPO_ROOT / "deploy" / "prometheus"
TEMPLATE = DEPLOY_DIR / "prometheus.yml"


def _debian_binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError(f"{name} is not installed (as root: apt-get install {name})")


def prometheus_binary() -> str:
    return _debian_binary("prometheus")


def redis_exporter_binary() -> str:
    return _debian_binary("prometheus-redis-exporter")


def redis_exporter_command(settings: ClusterSettings) -> list[str]:
    """Debian's Redis exporter: Redis' INFO (memory, evictions, keyspace hits) as metrics."""
    return [
        redis_exporter_binary(),
        f"-redis.addr=redis://127.0.0.1:{settings.redis_port}",
        f"-web.listen-address=127.0.0.1:{settings.redis_exporter_port}",
    ]


def config_dir(settings: ClusterSettings) -> Path:
    return settings.run_dir / "prometheus"


def config_path(settings: ClusterSettings) -> Path:
    return config_dir(settings) / "prometheus.yml"


def config(settings: ClusterSettings) -> dict[str, Any]:
    """The committed local configuration, pointed at this cluster's processes."""
    doc: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text())
    interval = settings.prometheus_scrape_interval
    doc["global"]["scrape_interval"] = interval
    doc["global"]["evaluation_interval"] = interval
    doc["rule_files"] = [str((DEPLOY_DIR / path).resolve()) for path in doc["rule_files"]]
    targets = {
        "gateway": [f"127.0.0.1:{port}" for port in settings.gateway_ports()],
        "worker": [f"127.0.0.1:{port}" for port in settings.worker_ports()],
        "redis": [f"127.0.0.1:{settings.redis_exporter_port}"],
        "prometheus": [f"127.0.0.1:{settings.prometheus_port}"],
    }
    for job in doc["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return doc


def write_config(settings: ClusterSettings) -> None:
    directory = config_dir(settings)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    config_path(settings).write_text(yaml.safe_dump(config(settings), sort_keys=False))


def prometheus_command(settings: ClusterSettings) -> list[str]:
    directory = config_dir(settings)
    return [
        prometheus_binary(),
        f"--config.file={config_path(settings)}",
        f"--storage.tsdb.path={directory / 'data'}",
        "--storage.tsdb.retention.time=2d",
        f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
    ]
