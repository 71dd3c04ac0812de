"""Pid-file bookkeeping: only the recorded process is ever signalled."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

from cluster import processes
from cluster.processes import ProcessRecord


def _sleeper(tmp_path: Path, name: str = "sleeper") -> ProcessRecord:
    return processes.spawn(
        name,
        ["/bin/sleep", "60"],
        env={},
        cwd=tmp_path,
        log_path=tmp_path / f"{name}.log",
        port=0,
        pid_dir=tmp_path / "pids",
    )


def test_spawn_records_and_stop_ends_the_process(tmp_path: Path) -> None:
    record = _sleeper(tmp_path)
    try:
        assert record.alive()
        loaded = ProcessRecord.load(tmp_path / "pids" / "sleeper.pid")
        assert loaded == record
        assert loaded.start_ticks > 0
    finally:
        processes.stop(record)
    assert not record.alive()


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    record = _sleeper(tmp_path)
    try:
        impostor = dataclasses.replace(record, start_ticks=record.start_ticks + 1)
        assert not impostor.alive()
        assert not processes.signal_record(impostor, signal.SIGTERM)
        processes.stop(impostor)
        assert record.alive()
    finally:
        processes.stop(record)


def test_a_stopped_process_is_still_stopped(tmp_path: Path) -> None:
    record = _sleeper(tmp_path)
    processes.signal_record(record, signal.SIGSTOP)
    processes.stop(record, timeout=5)
    assert not record.alive()


def test_a_process_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    record = processes.spawn(
        "stubborn",
        ["/bin/sh", "-c", "trap '' TERM; sleep 60 & wait"],
        env={},
        cwd=tmp_path,
        log_path=tmp_path / "stubborn.log",
        port=0,
        pid_dir=tmp_path / "pids",
    )
    processes.stop(record, timeout=0.5)
    assert not record.alive()
