"""A slow client reading a long stream through nginx: the worker's memory stays bounded.

The client asks for a long text as raw float32 PCM, with a small socket receive buffer, and
reads a few KB at a time with pauses, far below the rate the worker produces audio. Meanwhile
the resident memory (VmRSS) of the worker and the gateway is sampled, and other requests are
served.

Where backpressure stops today: nginx does not buffer responses (`proxy_buffering off`), so it
reads from the gateway only as fast as the client reads, and Hypercorn awaits the socket's
drain, so the gateway's response task waits too. The gateway's synthesis (its single-flight
producer, `gateway/service.py` `_produce`) is not tied to any one reader: it reads the worker's
stream as fast as it comes and keeps every byte in memory, for late joiners and for the cache
entry. So the worker never waits for a slow client: it finishes at engine speed and frees its
slot, and the gateway holds up to one whole response (at most the audio of
`GATEWAY_MAX_TEXT_CHARS` characters) per synthesis in flight. The test states both: the
worker's growth stays far below the stream's size (it would reach it if the worker buffered),
and the gateway's stays within a small multiple of one response. Figures:
`pytest tests/e2e/test_slow_client.py --log-cli-level=INFO`.

The worker is primed first: ONNX Runtime's arena grows by 100+ MiB steps the first few times it
meets Piper's largest input or two concurrent runs, which would hide a stream of a few MiB.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from cluster import launcher
from cluster.settings import ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports
from tests.support.audio import decode

logger = logging.getLogger(__name__)

LONG_TEXT = " ".join(
    f"Paragraph {n} goes on at length, so that the stream lasts for well over a minute of "
    "audio, while the listener on the other end takes it in a few kilobytes at a time."
    for n in range(20)
)
SHORT_TEXT = "Other listeners are served meanwhile."
# One sentence without a break: Piper cuts it into pieces of its largest size (200 phonemes).
PRIME_TEXT = " ".join(["and the listener keeps on reading every word"] * 12) + "."
READ_BYTES = 4096
PAUSE_S = 0.05
SLOW_PHASE_LIMIT_S = 30.0
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=1,
        workers=1,
    )
    try:
        launcher.up(settings)
        yield settings
    finally:
        launcher.down(settings)


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def audio_seconds(worker_port: int) -> float:
    """Seconds of audio the worker has produced in all (worker_audio_seconds_total)."""
    metrics = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).text
    match = re.search(r"^worker_audio_seconds_total (\S+)$", metrics, re.M)
    assert match is not None, "worker_audio_seconds_total is missing"
    return float(match.group(1))


def prime_worker(settings: ClusterSettings, pid: int, rounds: int = 10) -> int:
    """Run two concurrent syntheses of the longest pieces Piper makes until RSS holds still;
    return how many rounds that took.

    ONNX Runtime's memory arena grows in large steps (over 100 MiB) the first times it meets a
    larger input or a second concurrent run, then stays, and the heap grows a few MiB the first
    time it meets a long stream's chunk pattern: one-off costs, not buffering. They must be
    paid before measuring, or they hide the stream's size.
    """
    # The long stream itself, once: the allocator meets its chunk sizes (and the loudness
    # stage's temporaries) before measuring; a different text, so nothing comes from a cache.
    assert _speech(settings, LONG_TEXT + " Priming.") > 60
    for index in range(rounds):
        before = rss_bytes(pid)
        with ThreadPoolExecutor(max_workers=2) as pool:
            texts = [f"{PRIME_TEXT} Round {index}, voice {n}." for n in range(2)]
            for duration in pool.map(lambda text: _speech(settings, text), texts):
                assert duration > 1
        if rss_bytes(pid) - before < MIB:
            return index + 1
    raise AssertionError(f"the worker's memory did not settle after {rounds} rounds")


@dataclass
class Peaks:
    """Largest VmRSS seen per process while the slow client reads."""

    pids: dict[str, int]
    before: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.before = {name: rss_bytes(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.before)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def growth(self, name: str) -> int:
        return self.peak[name] - self.before[name]


def _slow_request(settings: ClusterSettings) -> socket.socket:
    body = urllib.parse.urlencode({"text": LONG_TEXT, "format": "pcm_f32le"}).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Set before connecting, so the advertised window is small from the start.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READ_BYTES)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", settings.public_port))
    head = (
        "POST /synthesize HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{settings.public_port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def _dechunk(raw: bytes) -> tuple[str, bytes]:
    """Split an HTTP/1.1 response into its head and its de-chunked body; a cut body raises."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    body = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return head.decode("latin-1"), bytes(body)
        if len(rest) < size + 2:
            raise AssertionError("the chunked body ended early")
        body += rest[:size]
        rest = rest[size + 2 :]


def _speech(settings: ClusterSettings, text: str) -> float:
    """One ordinary request through nginx; returns the seconds of audio it got."""
    response = httpx.post(
        f"{settings.public_url}/v1/audio/speech",
        json={"model": "tts-1", "input": text, "response_format": "wav"},
        headers={"Cache-Control": "no-store"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    audio = decode(response.content, "wav")
    assert audio.rms > 0.01
    return audio.duration


def test_slow_reader_leaves_the_worker_bounded(cluster: ClusterSettings) -> None:
    records = launcher.load_records(cluster)
    worker_port = cluster.worker_ports()[0]
    rounds = prime_worker(cluster, records["worker-0"].pid)
    peaks = Peaks({"worker": records["worker-0"].pid, "gateway": records["gateway-0"].pid})
    produced_before = audio_seconds(worker_port)
    raw = bytearray()
    sock = _slow_request(cluster)
    with sock, ThreadPoolExecutor(max_workers=1) as pool:
        start = time.monotonic()
        others = None
        lag_when_worker_done: int | None = None
        next_check = start
        while time.monotonic() - start < SLOW_PHASE_LIMIT_S:
            chunk = sock.recv(READ_BYTES)
            if not chunk:
                break
            raw += chunk
            if others is None and b"\r\n\r\n" in raw:
                others = pool.submit(
                    lambda: [_speech(cluster, f"{SHORT_TEXT} Number {i}.") for i in range(3)]
                )
            peaks.sample()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                # The short requests make a few seconds of audio; the long one nearly three
                # minutes (about 14 MiB): past 150 s the worker has made most of it.
                if audio_seconds(worker_port) - produced_before > 150:
                    lag_when_worker_done = len(raw)
                    break
            time.sleep(PAUSE_S)
        slow_seconds = time.monotonic() - start
        received_slowly = len(raw)
        # The worker may be done; the gateway still streams the rest. Read it at full speed.
        while chunk := sock.recv(1 << 20):
            raw += chunk
            peaks.sample()
        assert others is not None, bytes(raw[:300])
        other_durations = others.result(timeout=120)

    head, body = _dechunk(bytes(raw))
    assert head.startswith("HTTP/1.1 200"), head
    rate_header = re.search(r"(?im)^x-sample-rate:\s*(\d+)", head)
    assert rate_header is not None, head
    rate = int(rate_header.group(1))
    audio = decode(body, "pcm_f32le", rate)
    words = len(LONG_TEXT.split())
    assert words / 6 <= audio.duration <= words / 0.8, audio.duration
    assert audio.rms > 0.01
    quarters = np.array_split(audio.samples, 4)
    assert all(float(np.sqrt(np.mean(np.square(q)))) > 0.005 for q in quarters)
    assert all(seconds > 0.5 for seconds in other_durations), other_durations

    full = len(body)
    logger.info(
        "slow client: %.1f MiB stream, %.2f MiB read in %.1f s of slow reading "
        "(worker done: %s); peak RSS growth worker %.1f MiB, gateway %.1f MiB "
        "(after %d priming rounds)",
        full / MIB,
        received_slowly / MIB,
        slow_seconds,
        "yes" if lag_when_worker_done is not None else "no",
        peaks.growth("worker") / MIB,
        peaks.growth("gateway") / MIB,
        rounds,
    )
    # The test means something only if the stream dwarfs ordinary allocator noise, and the
    # client really lagged far behind what the worker could produce.
    assert full >= 6 * MIB, full
    assert received_slowly < full / 2, (received_slowly, full)
    # A worker that buffered the unread stream would grow by about `full - received_slowly`.
    assert peaks.growth("worker") < full / 2, (peaks.growth("worker"), full)
    # The gateway holds the whole response (single flight, cache entry): bounded by it.
    assert peaks.growth("gateway") < 3 * full + 32 * MIB, (peaks.growth("gateway"), full)
