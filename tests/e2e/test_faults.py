"""Faults through nginx, against a whole local cluster: each test states its outcome.

- A worker killed before its first byte: the client still succeeds (nginx passes it on).
- A worker killed mid-stream: the client sees an aborted response, nothing is cached, and the
  same request then succeeds on the other worker.
- A worker hung (SIGSTOP): nginx's worker read timeout, shorter than the gateway's, fires; the
  worker is skipped for fail_timeout and the request goes to the other one: clients succeed.
- Redis stopped, then restarted: requests are served uncached, then cached again; keys without
  a TTL (registered voices) survive the restart (append-only file).

A dead process is brought back by the launcher's idempotent `up`, which restarts only what died.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from cluster import launcher, processes
from cluster.settings import ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports

LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long passage, read slowly and with care." for n in range(12)
)
WORKER_READ_TIMEOUT_S = 6


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=1,
        workers=2,
        worker_read_timeout=f"{WORKER_READ_TIMEOUT_S}s",
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            # The gateway waits longer than nginx, so nginx notices a hung worker first.
            patch.setenv("GATEWAY_UPSTREAM_READ_TIMEOUT_S", "20")
            launcher.up(settings)
        yield settings
    finally:
        launcher.down(settings)


def _speech(
    settings: ClusterSettings, text: str, *, cache: bool = False, timeout: float = 60
) -> httpx.Response:
    return httpx.post(
        f"{settings.public_url}/v1/audio/speech",
        json={"model": "tts-1", "input": text, "response_format": "wav"},
        headers={} if cache else {"Cache-Control": "no-store"},
        timeout=timeout,
    )


def _active_worker(settings: ClusterSettings) -> str | None:
    for index, port in enumerate(settings.worker_ports()):
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        match = re.search(r"^worker_active_streams(?:\{[^}]*\})? (\S+)$", metrics, re.M)
        if match and float(match.group(1)) > 0:
            return f"worker-{index}"
    return None


def _syntheses(settings: ClusterSettings, name: str) -> float:
    port = settings.worker_base_port + int(name.split("-")[1])
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(r"^worker_syntheses_started_total (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


def _restart(settings: ClusterSettings, name: str, timeout: float = 30) -> None:
    """Start `name` again, then wait until nginx sends it work again (past fail_timeout)."""
    assert [record.name for record in launcher.up(settings)] == [name]
    if not name.startswith("worker-"):
        return
    before = _syntheses(settings, name)
    deadline = time.monotonic() + timeout
    while _syntheses(settings, name) == before:
        assert time.monotonic() < deadline, f"nginx never sent {name} work again"
        httpx.post(
            f"{settings.internal_url}/v1/synthesize",
            json={"text": "Back in rotation.", "format": "pcm"},
            timeout=30,
        )
        time.sleep(0.1)


def _log_tail(settings: ClusterSettings, name: str, lines: int = 30) -> str:
    path = settings.log_dir / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _record(settings: ClusterSettings, name: str) -> processes.ProcessRecord:
    return launcher.load_records(settings)[name]


def test_worker_killed_before_its_first_byte(cluster: ClusterSettings) -> None:
    # nginx holds keep-alive connections to both workers; the killed one's are reset.
    processes.signal_record(_record(cluster, "worker-0"), signal.SIGKILL)
    try:
        for index in range(6):
            response = _speech(cluster, f"Before the first byte, try {index}.")
            assert response.status_code == 200, response.text
            assert len(response.content) > 10_000
    finally:
        _restart(cluster, "worker-0")


def _read_killing_the_worker(
    settings: ClusterSettings, body: dict[str, str]
) -> tuple[int, str | None, Exception | None]:
    """Stream `body`; after the first chunk, SIGKILL the worker serving it; read on."""
    received = 0
    killed = None
    try:
        with httpx.stream(
            "POST", f"{settings.public_url}/v1/audio/speech", json=body, timeout=60
        ) as response:
            assert response.status_code == 200
            assert response.headers["X-Cache"] == "MISS"
            for chunk in response.iter_raw():
                received += len(chunk)
                if killed is None:
                    killed = _active_worker(settings)
                    assert killed is not None
                    processes.signal_record(_record(settings, killed), signal.SIGKILL)
    except httpx.HTTPError as error:
        return received, killed, error
    return received, killed, None


def test_worker_killed_mid_stream(cluster: ClusterSettings) -> None:
    body = {"model": "tts-1", "input": LONG_TEXT, "response_format": "pcm"}
    received, killed, error = _read_killing_the_worker(cluster, body)
    assert isinstance(error, httpx.HTTPError), error
    assert killed is not None
    try:
        # Nothing partial was cached: the same request is a MISS, and completes.
        again = httpx.post(f"{cluster.public_url}/v1/audio/speech", json=body, timeout=60)
        assert again.status_code == 200, (again.text, _log_tail(cluster, "gateway-0"))
        assert again.headers["X-Cache"] == "MISS"
        assert len(again.content) > received > 0
    finally:
        assert killed is not None
        _restart(cluster, killed)


def test_hung_worker_is_skipped(cluster: ClusterSettings) -> None:
    hung = _record(cluster, "worker-1")
    processes.signal_record(hung, signal.SIGSTOP)
    try:
        durations = []
        for index in range(6):
            start = time.monotonic()
            response = _speech(cluster, f"A hung worker, attempt {index}.")
            durations.append(time.monotonic() - start)
            assert response.status_code == 200, response.text
        # At most one request waits for nginx's read timeout; then the worker is skipped.
        slow = [d for d in durations if d >= WORKER_READ_TIMEOUT_S]
        assert len(slow) <= 1, durations
    finally:
        processes.signal_record(hung, signal.SIGCONT)


def test_redis_stopped_then_restarted(cluster: ClusterSettings) -> None:
    store = redis.Redis(port=cluster.redis_port)
    store.set("tts:test:voice-like", b"kept")  # no TTL, like a registered voice
    processes.stop(_record(cluster, "redis"))
    store.close()
    text = "Served while the cache is away."
    try:
        for _ in range(2):
            start = time.monotonic()
            response = _speech(cluster, text, cache=True)
            assert response.status_code == 200
            assert response.headers["X-Cache"] != "HIT"
            assert time.monotonic() - start < 30
    finally:
        _restart(cluster, "redis")
    store = redis.Redis(port=cluster.redis_port)
    try:
        assert store.get("tts:test:voice-like") == b"kept"
    finally:
        store.close()
    deadline = time.monotonic() + 30
    outcomes = []
    while time.monotonic() < deadline:
        outcomes.append(_speech(cluster, text, cache=True).headers["X-Cache"])
        if outcomes[-1] == "HIT":
            break
        time.sleep(0.5)
    assert outcomes[-1] == "HIT", outcomes
