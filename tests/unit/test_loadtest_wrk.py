"""The wrk scripts and `make loadtest`'s runner script, without any server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

WRK_DIR = Path(__file__).resolve().parents[2] / "loadtest" / "wrk"
WRK = shutil.which("wrk")


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WRK_DIR / "run.sh")],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOADTEST_DURATION": "1h"}, "must look like 10s or 2m"),
        ({"LOADTEST_DURATION": "0s"}, "must be 1s to 600s"),
        ({"LOADTEST_DURATION": "11m"}, "must be 1s to 600s"),
        ({"LOADTEST_MISS_DURATION": "5h"}, "LOADTEST_MISS_DURATION=5h must look like"),
        ({"LOADTEST_MISS_DURATION": "601s"}, "LOADTEST_MISS_DURATION=601s must be 1s to 600s"),
        ({"LOADTEST_URL": "127.0.0.1:8080"}, "must be http(s)://host[:port]"),
        ({"LOADTEST_URL": "http://h/v1"}, "must be http(s)://host[:port]"),
        ({"LOADTEST_THREADS": "x"}, "threads=x must be a whole number"),
        ({"LOADTEST_THREADS": "4", "LOADTEST_MISS_CONNECTIONS": "2"}, "at least the thread"),
        ({"LOADTEST_URL": "http://127.0.0.1:1"}, "answered '000'"),
    ],
)
def test_run_script_rejects_bad_settings(env: dict[str, str], message: str) -> None:
    if "answered" in message and (WRK is None or shutil.which("curl") is None):
        pytest.skip("wrk or curl is not installed; the script stops before the readiness check")
    result = run_script(env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Running" not in result.stdout


@dataclass
class Recorded:
    paths: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: set[str | None] = field(default_factory=set)


@pytest.fixture
def stub_server() -> Iterator[tuple[str, Recorded]]:
    """A stand-in speech server that records each POST and answers 200 with X-Cache: HIT."""
    recorded = Recorded()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            recorded.paths.append(self.path)
            recorded.auth.add(self.headers.get("Authorization"))
            recorded.bodies.append(json.loads(self.rfile.read(length)))
            body = b"\x00\x01" * 100
            self.send_response(200)
            self.send_header("Content-Type", "audio/pcm")
            self.send_header("X-Cache", "HIT")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorded
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_wrk(script: str, url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert WRK is not None
    return subprocess.run(
        [WRK, "-t2", "-c2", "-d1s", "-s", str(WRK_DIR / script), url],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(WRK is None, reason="wrk is not installed")
@pytest.mark.parametrize("script", ["hit.lua", "miss.lua"])
@pytest.mark.parametrize(
    ("api", "path", "text_field"),
    [("openai", "/v1/audio/speech", "input"), ("worker", "/v1/synthesize", "text")],
)
def test_script_sends_valid_json_and_reports_percentiles(
    script: str,
    api: str,
    path: str,
    text_field: str,
    stub_server: tuple[str, Recorded],
) -> None:
    url, recorded = stub_server
    result = run_wrk(script, url, {"WRK_API": api, "WRK_API_KEY": "k"})
    assert result.returncode == 0, result.stderr
    assert f"({api} api) ---" in result.stdout
    assert re.search(
        r"latency ms\s+p50 [\d.]+\s+p90 [\d.]+\s+p99 [\d.]+\s+p99\.9 [\d.]+", result.stdout
    )
    requests = int(re.search(r"requests\s+(\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert requests > 0
    assert f"statuses    200={requests}" in result.stdout
    assert f"x-cache     HIT={requests}" in result.stdout
    assert "errors      connect 0  read 0  write 0  timeout 0  non-2xx/3xx 0" in result.stdout
    assert set(recorded.paths) == {path}
    assert recorded.auth == {"Bearer k"}
    texts = [body[text_field] for body in recorded.bodies]
    if script == "hit.lua":
        assert len(set(texts)) == 1
    else:
        assert len(set(texts)) == len(texts)
    if api == "openai":
        assert set(recorded.bodies[0]) == {"model", "input", "voice", "response_format"}
    else:
        assert set(recorded.bodies[0]) == {"text", "format"}


@pytest.mark.skipif(WRK is None, reason="wrk is not installed")
def test_text_is_escaped_into_json(stub_server: tuple[str, Recorded]) -> None:
    url, recorded = stub_server
    text = 'She said "hi"\\ then\tleft.'
    result = run_wrk("hit.lua", url, {"WRK_TEXT": text})
    assert result.returncode == 0, result.stderr
    assert recorded.bodies[0]["input"] == text


@pytest.mark.skipif(WRK is None, reason="wrk is not installed")
def test_unknown_api_is_refused() -> None:
    assert WRK is not None
    result = subprocess.run(
        [WRK, "-t1", "-c1", "-d1s", "-s", str(WRK_DIR / "hit.lua"), "http://127.0.0.1:1"],
        env={"PATH": "/usr/bin:/bin", "WRK_API": "grpc"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "WRK_API=grpc is not openai or worker" in result.stdout + result.stderr
