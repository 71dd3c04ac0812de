"""Start, stop and inspect a local cluster; every process is tracked by a pid file.

`up` is idempotent: services whose recorded process still runs are left alone, the others are
started. `down` signals only the processes named in pid files (after checking each pid still
belongs to the process that was started), never anything found by name.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import devices, monitor, nginx_config, probes, processes, services
from cluster.processes import ProcessRecord
from cluster.settings import REPO_ROOT, ClusterSettings

logger = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
# Stop order: the entry first, then what it depends on.
STOP_ORDER = ("prometheus", "nginx", "gateway", "worker", "redis")


class ClusterError(RuntimeError):
    """The cluster could not be started as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int
    port: int
    alive: bool
    ready: bool
    log_path: str


def load_records(settings: ClusterSettings) -> dict[str, ProcessRecord]:
    if not settings.pid_dir.is_dir():
        return {}
    return {
        path.stem: ProcessRecord.load(path) for path in sorted(settings.pid_dir.glob("*.pid"))
    }


def _state_path(settings: ClusterSettings) -> Path:
    return settings.run_dir / STATE_FILE


def _check_same_settings(settings: ClusterSettings, records: dict[str, ProcessRecord]) -> None:
    state = _state_path(settings)
    if not state.exists() or not any(record.alive() for record in records.values()):
        return
    running = ClusterSettings.model_validate_json(state.read_text())
    if running != settings:
        raise ClusterError(
            f"a cluster with other settings runs from {settings.run_dir}; "
            "stop it first (make down), then start again"
        )


def up(settings: ClusterSettings) -> list[ProcessRecord]:
    """Start every service that is not already running, then wait until all are ready.

    Returns the records of the processes this call started. If a service fails to start or
    is not ready within `settings.ready_timeout`, what this call started is stopped again and
    ClusterError carries the end of the failing service's log.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    # nginx's workers may run as nobody (when started as root): they must reach their temp dir.
    settings.run_dir.chmod(0o755)
    records = load_records(settings)
    _check_same_settings(settings, records)
    plan = services.plan(settings)
    for line in devices.describe(settings.worker_assignment(), settings.worker_device_list()):
        logger.info("%s", line)
    to_start = [svc for svc in plan if not (svc.name in records and records[svc.name].alive())]
    for svc in to_start:
        for host, port in svc.binds:
            if not probes.port_free(host, port):
                raise ClusterError(
                    f"{svc.name} cannot start: {host}:{port} is in use by another program "
                    "(choose other ports, e.g. CLUSTER_PUBLIC_PORT=...)"
                )
    if to_start:
        services.write_redis_config(settings)
        if any(svc.name == "nginx" for svc in to_start):
            nginx_config.write_config(settings)
        if any(svc.name == "prometheus" for svc in to_start):
            monitor.write_config(settings)
        _state_path(settings).write_text(settings.model_dump_json(indent=2))
    started: list[ProcessRecord] = []
    try:
        for svc in to_start:
            started.append(_spawn(settings, svc))
            if svc.name == "redis":
                _wait_ready(settings, [svc], started)
        _wait_ready(settings, plan, started)
    except BaseException:
        for record in reversed(started):
            processes.stop(record)
            (settings.pid_dir / f"{record.name}.pid").unlink(missing_ok=True)
        raise
    return started


def _spawn(settings: ClusterSettings, svc: services.Service) -> ProcessRecord:
    logger.info("starting %s on port %d", svc.name, svc.port)
    return processes.spawn(
        svc.name,
        svc.argv,
        env={**os.environ, **svc.env},
        cwd=REPO_ROOT,
        log_path=settings.log_dir / f"{svc.name}.log",
        port=svc.port,
        pid_dir=settings.pid_dir,
    )


def _wait_ready(
    settings: ClusterSettings, plan: list[services.Service], started: list[ProcessRecord]
) -> None:
    deadline = time.monotonic() + settings.ready_timeout
    pending = {svc.name: svc for svc in plan}
    by_name = {record.name: record for record in started}
    while pending:
        for name, svc in list(pending.items()):
            record = by_name.get(name)
            if record is not None and not record.alive():
                processes.reap(record.pid)
                raise ClusterError(f"{name} exited during start-up:\n{_log_tail(record)}")
            if svc.ready():
                logger.info("%s is ready", name)
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(sorted(pending))
            tails = "\n".join(_log_tail(by_name[n]) for n in sorted(pending) if n in by_name)
            raise ClusterError(
                f"not ready after {settings.ready_timeout:.0f} s: {names}\n{tails}"
            )
        time.sleep(0.2)


def _log_tail(record: ProcessRecord, lines: int = 30) -> str:
    path = Path(record.log_path)
    if not path.exists():
        return f"--- {record.name}: no log"
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {record.name} ({path}):\n" + "\n".join(tail)


def _stop_rank(name: str) -> int:
    kind = name.split("-")[0]
    return STOP_ORDER.index(kind) if kind in STOP_ORDER else len(STOP_ORDER)


def down(settings: ClusterSettings) -> list[str]:
    """Stop every process recorded under the run dir; return the names that were running."""
    stopped = []
    records = load_records(settings)
    for name in sorted(records, key=lambda n: (_stop_rank(n), n)):
        record = records[name]
        if record.alive():
            logger.info("stopping %s (pid %d)", name, record.pid)
            processes.stop(record)
            stopped.append(name)
        else:
            processes.reap(record.pid)
        (settings.pid_dir / f"{name}.pid").unlink(missing_ok=True)
    _state_path(settings).unlink(missing_ok=True)
    return stopped


def status(settings: ClusterSettings) -> list[ServiceStatus]:
    """Each recorded process: whether it runs and whether its readiness probe passes."""
    records = load_records(settings)
    ready_probes = {svc.name: svc.ready for svc in services.plan(running_settings(settings))}
    rows = []
    for name, record in records.items():
        alive = record.alive()
        ready_probe = ready_probes.get(name)
        rows.append(
            ServiceStatus(
                name=name,
                pid=record.pid,
                port=record.port,
                alive=alive,
                ready=alive and ready_probe is not None and ready_probe(),
                log_path=record.log_path,
            )
        )
    return sorted(rows, key=lambda row: (-_stop_rank(row.name), row.name))


def running_settings(settings: ClusterSettings) -> ClusterSettings:
    """The settings the cluster under `settings.run_dir` was started with, if it runs."""
    state = _state_path(settings)
    if state.exists():
        return ClusterSettings.model_validate_json(state.read_text())
    return settings
