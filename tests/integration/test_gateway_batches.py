"""Batches against a real Piper worker that admits little: they complete, and stop on hang-up.

The worker runs one synthesis at a time with one queue place (admits 2), so a batch that fanned
out all its items at once would get most of them refused; the gateway runs two at a time and
every item succeeds. A client that hangs up one second into a long batch frees the worker
within a few seconds: its active streams drop to zero, no further synthesis starts, and the
next request is served.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.integration.test_gateway_integration import gateway, metric, syntheses, worker
from tests.support.audio import decode
from tests.support.processes import RunningProcess, redis_server

ITEMS = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningProcess]]:
    root = tmp_path_factory.mktemp("batches")
    with ExitStack() as stack:
        store = stack.enter_context(redis_server(root / "redis"))
        synth = stack.enter_context(
            worker(root, WORKER_MAX_CONCURRENCY="1", WORKER_MAX_QUEUE="1")
        )
        front = stack.enter_context(
            gateway(root, store.port, synth.url, GATEWAY_BATCH_CONCURRENCY="2")
        )
        yield {"worker": synth, "gateway": front}


def test_a_batch_larger_than_the_workers_admission_completes(
    stack: dict[str, RunningProcess],
) -> None:
    items = [{"text": f"Batch item number {n}.", "format": "wav"} for n in range(ITEMS)]
    response = httpx.post(
        f"{stack['gateway'].url}/synthesize_batch",
        json={"items": items},
        headers={"Cache-Control": "no-store"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["index"] for result in results] == list(range(ITEMS))
    assert [result["status"] for result in results] == [200] * ITEMS, results
    for result in results:
        audio = decode(base64.b64decode(result["audio"]), "wav")
        assert audio.sample_rate == 22050
        assert 0.5 < audio.duration < 5.0
        assert audio.rms > 0.01


def active_streams(synth: RunningProcess) -> float:
    return metric(httpx.get(f"{synth.url}/metrics", timeout=5).text, "worker_active_streams")


def test_a_client_that_hangs_up_cancels_its_batch(stack: dict[str, RunningProcess]) -> None:
    synth, front = stack["worker"], stack["gateway"]
    text = "A longer batch item that keeps the worker busy for a good while, on and on. " * 3
    body = httpx.Request(
        "POST", "/", json={"items": [{"text": f"{n}. {text}"} for n in range(32)]}
    ).read()
    started_before = syntheses(synth)
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
        sock.sendall(
            (
                "POST /synthesize_batch HTTP/1.1\r\nHost: gateway\r\n"
                "Content-Type: application/json\r\nCache-Control: no-store\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        deadline = time.monotonic() + 20
        while syntheses(synth) == started_before:
            assert time.monotonic() < deadline, "the batch never reached the worker"
            time.sleep(0.05)
        time.sleep(1.0)
    hung_up = time.monotonic()
    while active_streams(synth) > 0:
        assert time.monotonic() - hung_up < 10, "the worker kept synthesizing for nobody"
        time.sleep(0.1)
    started = syntheses(synth)
    time.sleep(1.0)
    assert syntheses(synth) == started, "items went on starting after the hang-up"
    assert started - started_before < 10
    after = httpx.post(
        f"{front.url}/v1/audio/speech",
        json={"model": "tts-1", "input": "Served right after.", "response_format": "wav"},
        timeout=60,
    )
    assert after.status_code == 200, after.text


def close_wait_sockets(pid: int) -> int:
    """Sockets of process `pid` in CLOSE-WAIT (from /proc/net/tcp*, by socket inode)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "08" and fields[9] in inodes:  # 08: CLOSE_WAIT
                waiting += 1
    return waiting


@pytest.mark.parametrize("service", ["worker", "gateway"])
def test_connections_a_client_closed_are_closed_at_once(
    stack: dict[str, RunningProcess], service: str
) -> None:
    """Readiness probes, short-lived clients and nginx retiring keep-alive connections all
    close first; the service must close its side then, not after its keep-alive timeout."""
    running = stack[service]
    for _ in range(10):
        httpx.get(f"{running.url}/readyz", timeout=5)  # a fresh connection, closed after
        socket.create_connection(("127.0.0.1", running.port), timeout=5).close()  # no request
    deadline = time.monotonic() + 5
    while (left := close_wait_sockets(running.process.pid)) > 0:
        assert time.monotonic() < deadline, f"{left} sockets still in CLOSE-WAIT after 5 s"
        time.sleep(0.1)
