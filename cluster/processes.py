"""Detached service processes recorded in pid files, so `down` stops exactly what `up` started.

A pid file holds the pid and the process's start time (from /proc), so a pid that the kernel
has since given to another process is never signalled. Each service runs in its own session:
its process group id is its pid, and stopping it signals that group only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int
    argv: list[str]
    port: int
    log_path: str

    def save(self, pid_dir: Path) -> None:
        pid_dir.mkdir(parents=True, exist_ok=True)
        path = pid_dir / f"{self.name}.pid"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> ProcessRecord:
        return cls(**json.loads(path.read_text()))

    def alive(self) -> bool:
        """True while the recorded process (the same one, not a reused pid) runs."""
        stat = _proc_stat(self.pid)
        return stat is not None and stat[1] != "Z" and stat[2] == self.start_ticks


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(pid, state, start time in clock ticks) from /proc/<pid>/stat, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return pid, fields[0], int(fields[19])


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    port: int,
    pid_dir: Path,
) -> ProcessRecord:
    """Start `argv` in a new session with output appended to `log_path`; record it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = _spawn_in(cwd, argv, env, log_fd, devnull)
    finally:
        os.close(log_fd)
        os.close(devnull)
    stat = _proc_stat(pid)
    record = ProcessRecord(
        name=name,
        pid=pid,
        start_ticks=stat[2] if stat else -1,
        argv=list(argv),
        port=port,
        log_path=str(log_path),
    )
    record.save(pid_dir)
    return record


def _spawn_in(
    cwd: Path, argv: Sequence[str], env: Mapping[str, str], log_fd: int, devnull: int
) -> int:
    """posix_spawn has no working-directory action before Python 3.13: change it around."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return os.posix_spawn(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.chdir(previous)


def reap(pid: int) -> None:
    """Collect the exit status of a child of this process (no-op for anyone else's)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def signal_record(record: ProcessRecord, sig: int) -> bool:
    """Send `sig` to the recorded process's group (its own session); False if it is gone."""
    if not record.alive():
        return False
    try:
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, sig)
        else:
            os.kill(record.pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop(record: ProcessRecord, timeout: float = 15.0) -> None:
    """SIGTERM (after SIGCONT, for a stopped process), then SIGKILL after `timeout` seconds."""
    if not signal_record(record, signal.SIGCONT):
        reap(record.pid)
        return
    signal_record(record, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(record.pid)
        if not record.alive():
            return
        time.sleep(0.05)
    signal_record(record, signal.SIGKILL)
    while record.alive():
        reap(record.pid)
        time.sleep(0.05)
