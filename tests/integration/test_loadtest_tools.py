"""The benchmark runner and the wrk scripts against a real worker, gateway and Redis."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from loadtest.runner.audio import audio_stats
from tests.support.processes import REPO_ROOT, free_port, python_service, redis_server
from tests.unit.test_loadtest_k6 import NODE, dry_run

WORKER_SLOTS = 2
WORKER_QUEUE = 2


@dataclass(frozen=True)
class Stack:
    worker_url: str
    gateway_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, one Piper worker (two synthesis slots, two queue places) and a gateway before it."""
    logs = tmp_path_factory.mktemp("loadtest-logs")
    worker_port, gateway_port = free_port(), free_port()
    with (
        redis_server(tmp_path_factory.mktemp("loadtest-redis")) as redis,
        python_service(
            "worker",
            {
                "WORKER_HOST": "127.0.0.1",
                "WORKER_PORT": str(worker_port),
                "WORKER_THREADS": "1",
                "WORKER_MAX_CONCURRENCY": str(WORKER_SLOTS),
                "WORKER_MAX_QUEUE": str(WORKER_QUEUE),
            },
            port=worker_port,
            log_dir=logs,
            timeout=120.0,
        ) as worker,
        python_service(
            "gateway",
            {
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(gateway_port),
                "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
                "GATEWAY_WORKER_URL": worker.url,
                "GATEWAY_API_KEYS": "",
            },
            port=gateway_port,
            log_dir=logs,
        ) as gateway,
    ):
        yield Stack(worker_url=worker.url, gateway_url=gateway.url)


def run_bench(args: list[str], out: Path) -> tuple[subprocess.CompletedProcess[str], Any]:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.runner", *args, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.with_suffix(".json").read_text())


def test_runner_compares_a_worker_and_the_gateway_apis(stack: Stack, tmp_path: Path) -> None:
    _, doc = run_bench(
        [
            "--target", f"label=worker,url={stack.worker_url},api=worker,texts=unique,format=wav",
            "--target", f"label=gateway,url={stack.gateway_url},texts=repeat",
            "--target", f"label=seed,url={stack.gateway_url},api=seed,texts=repeat",
            "--prime", "--pool-size", "2",
            "--concurrency", "1,2", "--duration", "2", "--max-requests", "3",
        ],
        tmp_path / "bench",
    )  # fmt: skip
    levels = doc["levels"]
    assert [(lv["target"], lv["concurrency"]) for lv in levels] == [
        ("worker", 1),
        ("gateway", 1),
        ("seed", 1),
        ("seed", 2),
        ("gateway", 2),
        ("worker", 2),
    ]
    for level in levels:
        assert 1 <= level["requests"] <= 3
        assert level["errors"] == 0, level["errors_by_code"]
        assert level["ok"] == level["requests"]
        per_request_audio = level["audio_seconds"] / level["ok"]
        # Pool phrases last about 2-5 s; unique texts add "Reference <id> <n>." to one.
        assert 1.0 < per_request_audio < 15.0
        assert level["ttfa_s"]["count"] == level["ok"]
        assert 0 < level["ttfa_s"]["p50"] <= level["latency_s"]["p50"]
        assert level["latency_s"]["p50"] <= level["latency_s"]["p95"] <= level["latency_s"]["p99"]
        assert 0 < level["rtf"]["p50"] < 10
        assert level["requests_per_s"] == pytest.approx(level["ok"] / level["elapsed_s"])
        assert level["audio_seconds_per_s"] == pytest.approx(
            level["audio_seconds"] / level["elapsed_s"]
        )
    for level in levels:
        if level["target"] == "worker":
            assert level["cache_hit_ratio"] is None
        else:
            assert level["cache_hit_ratio"] == 1.0
            assert level["cache"] == {"HIT": level["requests"]}
    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "api_key" not in doc["plan"]


def test_runner_counts_busy_refusals_by_status(stack: Stack, tmp_path: Path) -> None:
    result, doc = run_bench(
        [
            "--target", f"label=worker,url={stack.worker_url},api=worker,texts=unique",
            "--concurrency", str(2 * (WORKER_SLOTS + WORKER_QUEUE)),
            "--duration", "20", "--max-requests", "12",
        ],
        tmp_path / "busy",
    )  # fmt: skip
    (level,) = doc["levels"]
    assert level["requests"] == 12
    assert 1 <= level["ok"] <= 12 - 1
    assert level["errors_by_status"] == {"503": level["errors"]}
    assert level["errors_by_code"] == {"busy": level["errors"]}
    assert "errors by status {503:" in result.stdout


def _block(output: str, name: str) -> dict[str, str]:
    """The lines of one done() block of the wrk scripts, by their first word."""
    lines = output.split(f"--- {name} ")[1].splitlines()[1:6]
    return {line.split()[0]: line for line in lines}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_hit_and_miss_paths_through_the_gateway(stack: Stack) -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "loadtest" / "wrk" / "run.sh")],
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LOADTEST_URL": stack.gateway_url,
            "LOADTEST_DURATION": "2s",
            # wrk counts only requests that finish in time: room for a synthesis on a busy CI.
            "LOADTEST_MISS_DURATION": "15s",
            "LOADTEST_THREADS": "1",
            "LOADTEST_HIT_CONNECTIONS": "1",
            "LOADTEST_MISS_CONNECTIONS": "1",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    hit = _block(result.stdout, "hit path")
    hits = int(re.search(r"requests\s+(\d+)", hit["requests"]).group(1))  # type: ignore[union-attr]
    assert hits > 0
    assert re.search(r"p50 [\d.]+\s+p90 [\d.]+\s+p99 [\d.]+\s+p99\.9 [\d.]+", hit["latency"])
    assert "200=" in hit["statuses"]
    assert "HIT=" in hit["x-cache"]
    assert hit["errors"].split()[1:] == [
        "connect", "0", "read", "0", "write", "0", "timeout", "0", "non-2xx/3xx", "0"
    ]  # fmt: skip
    miss = _block(result.stdout, "miss path")
    misses = int(re.search(r"requests\s+(\d+)", miss["requests"]).group(1))  # type: ignore[union-attr]
    assert misses > 0
    assert "MISS=" in miss["x-cache"]
    assert "HIT=" not in miss["x-cache"]
    assert "non-2xx/3xx 0" in miss["errors"]


def replay(client: httpx.Client, base_url: str, request: dict[str, Any]) -> httpx.Response:
    """Send one request that a k6 dry run recorded, to `base_url` instead of its BASE_URL."""
    url = base_url + urlsplit(request["url"]).path
    headers = dict(request["headers"])
    body = request["body"]
    if body["kind"] == "none":
        return client.request(request["method"], url, headers=headers)
    if body["kind"] == "json":
        content = json.dumps(body["fields"]).encode()
        return client.request(request["method"], url, content=content, headers=headers)
    assert body["kind"] == "multipart", body["kind"]
    headers.pop("Content-Type", None)
    files: dict[str, tuple[str | None, bytes | str] | tuple[str, bytes, str]] = {}
    for name, value in body["fields"].items():
        if name in body["files"]:
            files[name] = (
                value["filename"],
                base64.b64decode(value["base64"]),
                value["content_type"],
            )
        else:
            files[name] = (None, str(value))
    return client.request(request["method"], url, files=files, headers=headers)


def _assert_speech(response: httpx.Response, cache: str | None) -> None:
    assert response.status_code == 200, response.text
    if cache is not None:
        assert response.headers["x-cache"] == cache
    headers = {k.lower(): v for k, v in response.headers.items()}
    audio = audio_stats(response.content, headers["x-audio-format"], headers)
    assert 0.5 < audio.seconds < 15.0
    assert audio.peak > 0.01


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_k6_scenarios_requests_pass_their_checks_against_the_real_gateway(stack: Stack) -> None:
    """Every request a scenario sends, replayed against a real gateway (Piper, no cloning),
    gets the answer that the scenario's checks expect."""
    expected_cache = {"hits.js": "HIT", "misses.js": "MISS", "streaming.js": "BYPASS"}
    with httpx.Client(timeout=120.0) as client:
        for script in ("hits.js", "misses.js", "mix.js", "streaming.js"):
            doc = dry_run(script, iterations=1)
            for index, request in enumerate(doc["requests"]):
                response = replay(client, stack.gateway_url, request)
                measured = index >= doc["setup_requests"]
                _assert_speech(response, expected_cache.get(script) if measured else None)
        doc = dry_run("multipart.js", iterations=1)
        models, upload = (replay(client, stack.gateway_url, r) for r in doc["requests"])
        assert models.status_code == 200
        assert not any(m["capabilities"]["supports_cloning"] for m in models.json()["data"])
        assert upload.status_code == 422, upload.text
        assert upload.json()["error"]["code"] == "prompt_unsupported"
