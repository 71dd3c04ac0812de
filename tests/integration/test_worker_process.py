"""`python -m worker` as a process: clean exit on SIGTERM, non-zero exit on a bad start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.processes import REPO_ROOT, free_port, python_service


def run_worker(env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=REPO_ROOT,
        env={**os.environ, "WORKER_PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_engine_that_cannot_load_exits_non_zero(tmp_path: Path) -> None:
    result = run_worker({"WORKER_VOICES_DIR": str(tmp_path / "missing")})
    assert result.returncode == 1
    assert "engine" in result.stderr.lower()


def test_misspelt_setting_exits_non_zero() -> None:
    result = run_worker({"WORKER_MAX_CONCURENCY": "2"})
    assert result.returncode != 0
    assert "WORKER_MAX_CONCURENCY" in result.stderr


def test_sigterm_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    with python_service("worker", {"WORKER_PORT": str(port)}, port=port, log_dir=tmp_path) as w:
        pass
    assert w.process.returncode == 0, w.log()


def test_json_logs_carry_the_request_id(tmp_path: Path) -> None:
    port = free_port()
    env = {"WORKER_PORT": str(port), "WORKER_LOG_JSON": "true", "WORKER_LOG_LEVEL": "INFO"}
    with python_service("worker", env, port=port, log_dir=tmp_path) as w:
        response = httpx.post(
            f"{w.url}/v1/synthesize",
            json={"text": "Logged."},
            headers={"X-Request-ID": "log-me-42"},
            timeout=60.0,
        )
        assert response.status_code == 200
    records = [json.loads(line) for line in w.log().splitlines() if line.startswith("{")]
    assert any(record["request_id"] == "log-me-42" for record in records), records
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
