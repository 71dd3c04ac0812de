"""SIGTERM drains a worker: it stops accepting connections and finishes the streams it has.

Kubernetes stops a pod with SIGTERM and waits terminationGracePeriodSeconds; the manifests set
WORKER_SHUTDOWN_GRACE_S to the longest a stream may last (docs/kubernetes.md). Here a real
Piper worker gets SIGTERM while it streams a long synthesis: the stream still ends complete,
a new connection is refused meanwhile, and the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import httpx

from tests.support.audio import decode
from tests.support.processes import free_port, python_service

TEXT = " ".join(f"Sentence number {n} keeps this stream going for a while." for n in range(12))


def test_sigterm_lets_the_open_stream_finish(tmp_path: Path) -> None:
    port = free_port()
    env = {"WORKER_PORT": str(port), "WORKER_THREADS": "1", "WORKER_SHUTDOWN_GRACE_S": "60"}
    with python_service("worker", env, port=port, log_dir=tmp_path, timeout=180.0) as worker:
        body = {"text": TEXT, "format": "wav"}
        first_chunk = threading.Event()
        received = bytearray()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                with httpx.stream(
                    "POST", f"{worker.url}/v1/synthesize", json=body, timeout=120
                ) as response:
                    assert response.status_code == 200, response.read()
                    for chunk in response.iter_bytes():
                        received.extend(chunk)
                        first_chunk.set()
            except (httpx.HTTPError, AssertionError) as error:
                errors.append(error)
                first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60), "no audio before the signal"
        worker.process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert not reader.is_alive()
        assert not errors, f"the stream broke off: {errors[0]!r}"
        assert worker.process.wait(timeout=60) == 0
        refused = False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            refused = True
        assert refused, "the worker still accepts connections after SIGTERM"
    audio = decode(bytes(received), "wav", 22050)
    words = len(TEXT.split())
    assert audio.duration >= 0.15 * words, f"the stream was cut at {audio.duration:.1f} s"
    assert audio.rms > 0.01
