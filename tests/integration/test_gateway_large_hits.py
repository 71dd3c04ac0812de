"""A large cached entry under concurrent slow readers: every reader hits, memory stays capped.

Real redis-server, a real Hypercorn gateway, and the stand-in worker (testbed/stub_worker.py),
which makes a 7 MB response on request. 40 clients then read that entry at once, slowly, with
small socket buffers, while other keys are asked for: every one of the 40 is a hit with the
exact bytes, the other keys keep hitting, Redis is never taken for down, and the gateway's
resident memory grows by less than its cap. A second gateway with a cap below what 40 readers
would hold answers new requests 503 `busy` with Retry-After while its readers finish.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.processes import RunningProcess, free_port, python_service, redis_server

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
CHUNK_BYTES = 4800  # one stub chunk: 0.1 s of 24 kHz 16-bit PCM
BIG_CHUNKS = 1460  # 7.0 MB
BIG_TEXT = f"chunks={BIG_CHUNKS} a long recording"
READERS = 40
READ_BYTES = 64 * 1024
READ_PAUSE_S = 0.02
CAP = 32 * MIB
SMALL_CAP = 4 * MIB


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def gateway(root: Path, redis_port: int, worker_url: str, cap: int) -> python_service:  # type: ignore[valid-type]
    port = free_port()
    return python_service(
        "gateway",
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "GATEWAY_WORKER_URL": worker_url,
            "GATEWAY_MAX_HELD_AUDIO_BYTES": str(cap),
        },
        port=port,
        log_dir=root,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningProcess]]:
    root = tmp_path_factory.mktemp("large-hits")
    worker_port = free_port()
    with ExitStack() as stack:
        store = stack.enter_context(redis_server(root / "redis"))
        worker = stack.enter_context(
            python_service(
                "testbed.stub_worker",
                {"WORKER_PORT": str(worker_port)},
                port=worker_port,
                log_dir=root,
            )
        )
        wide = stack.enter_context(gateway(root, store.port, worker.url, CAP))
        narrow = stack.enter_context(gateway(root, store.port, worker.url, SMALL_CAP))
        yield {"redis": store, "worker": worker, "gateway": wide, "narrow": narrow}


def speech(url: str, text: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/audio/speech",
        json={"model": "tts-1", "input": text, "response_format": "pcm"},
        timeout=60,
    )


def slow_read(port: int, text: str) -> tuple[str, bytes]:
    """One request read a little at a time through a small receive buffer: head and body."""
    body = json.dumps({"model": "tts-1", "input": text, "response_format": "pcm"}).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READ_BYTES)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            (
                "POST /v1/audio/speech HTTP/1.1\r\nHost: gateway\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            + body
        )
        raw = bytearray()
        while chunk := sock.recv(READ_BYTES):
            raw += chunk
            time.sleep(READ_PAUSE_S)
    head, _, rest = bytes(raw).partition(b"\r\n\r\n")
    return head.decode("latin-1"), dechunk(rest) if b"chunked" in head.lower() else rest


def dechunk(rest: bytes) -> bytes:
    body = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(body)
        if len(rest) < size + 2:
            raise AssertionError("the chunked body ended early")
        body += rest[:size]
        rest = rest[size + 2 :]


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def prime(url: str) -> tuple[bytes, list[str]]:
    """Cache the big entry and a few small ones through `url`; return the big body."""
    big = speech(url, BIG_TEXT)
    assert big.status_code == 200, big.text
    assert len(big.content) == BIG_CHUNKS * CHUNK_BYTES
    smalls = [f"A short phrase, number {n}." for n in range(4)]
    for text in smalls:
        assert speech(url, text).status_code == 200
    deadline = time.monotonic() + 10
    while speech(url, BIG_TEXT).headers.get("X-Cache") != "HIT":  # the entry is being written
        assert time.monotonic() < deadline, "the big entry was never cached"
    return big.content, smalls


def test_forty_slow_readers_of_a_7_mb_entry_all_hit_within_the_cap(
    stack: dict[str, RunningProcess],
) -> None:
    front = stack["gateway"]
    expected, smalls = prime(front.url)
    pid = front.process.pid
    errors_before = metric(front.url, "gateway_cache_errors_total")
    before = rss_bytes(pid)
    peak = before
    held_peak = 0.0
    other_hits: list[str] = []
    done = threading.Event()

    def others() -> None:
        while not done.is_set():
            for text in smalls:
                other_hits.append(speech(front.url, text).headers.get("X-Cache", "?"))

    with ThreadPoolExecutor(max_workers=READERS + 1) as pool:
        side = pool.submit(others)
        readers = [pool.submit(slow_read, front.port, BIG_TEXT) for _ in range(READERS)]
        while not all(reader.done() for reader in readers):
            peak = max(peak, rss_bytes(pid))
            held_peak = max(held_peak, metric(front.url, "gateway_audio_bytes_held"))
            time.sleep(0.05)
        done.set()
        side.result()
    results = [reader.result() for reader in readers]
    for head, body in results:
        assert head.startswith("HTTP/1.1 200"), head
        assert "x-cache: HIT" in head.replace("X-Cache", "x-cache"), head
        assert body == expected
    logger.info(
        "40 slow readers: RSS +%.1f MiB, held at most %.1f MiB, %d other hits",
        (peak - before) / MIB,
        held_peak / MIB,
        len(other_hits),
    )
    assert other_hits, "no other key was asked for meanwhile"
    assert set(other_hits) == {"HIT"}, other_hits
    assert metric(front.url, "gateway_cache_errors_total") == errors_before
    assert peak - before < CAP, f"the gateway grew by {(peak - before) / MIB:.0f} MiB"
    assert held_peak <= CAP


def test_above_its_cap_a_gateway_answers_busy_while_its_readers_finish(
    stack: dict[str, RunningProcess],
) -> None:
    narrow = stack["narrow"]
    expected, _ = prime(narrow.url)
    held_peak = 0.0
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        readers = [pool.submit(slow_read, narrow.port, BIG_TEXT) for _ in range(READERS)]
        while not all(reader.done() for reader in readers):
            held_peak = max(held_peak, metric(narrow.url, "gateway_audio_bytes_held"))
            time.sleep(0.05)
    results = [reader.result() for reader in readers]
    served = [body for head, body in results if head.startswith("HTTP/1.1 200")]
    refused = [(head, body) for head, body in results if not head.startswith("HTTP/1.1 200")]
    logger.info(
        "cap %d MiB: %d served, %d refused, held at most %.1f MiB",
        SMALL_CAP // MIB,
        len(served),
        len(refused),
        held_peak / MIB,
    )
    assert served, "no reader was served"
    assert refused, "no reader was refused although 40 pieces do not fit under the cap"
    assert all(body == expected for body in served)
    for head, body in refused:
        assert head.startswith("HTTP/1.1 503"), head
        assert "retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "busy"
    assert held_peak <= SMALL_CAP
    assert metric(narrow.url, "gateway_byte_cap_refusals_total") == len(refused)
    assert metric(narrow.url, "gateway_audio_bytes_held") == 0
