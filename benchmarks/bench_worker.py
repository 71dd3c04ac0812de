"""Benchmark one worker: time to first audio, real-time factor and audio-seconds per second.

Starts `python -m worker` on a free loopback port (or targets `--url`), then, for each
concurrency level, keeps that many requests in flight until `--requests` have completed, and
prints TTFA p50/p95 (request sent -> first audio byte), RTF p50/p95 (request wall time over
audio duration) and audio-seconds produced per wall-clock second. Targets 127.0.0.1 only.

    .venv/bin/python benchmarks/bench_worker.py --concurrency 1 2 4 --requests 24

`--cleanup` instead measures, in this process, what the seed service's per-request
`gc.collect()` and `torch.cuda.empty_cache()` would cost: Piper syntheses with and without a
collection after each, with torch and a transformer-sized model on the heap, and (when CUDA is
available) a GPU workload of varying lengths with and without `empty_cache()` after each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[1]
TWO_SENTENCES = (
    "The weather service expects light rain this afternoon. "
    "Please remember to bring an umbrella when you leave the office."
)


@dataclass(frozen=True)
class Sample:
    ttfa: float
    wall: float
    audio_seconds: float


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    ttfa_p50_ms: float
    ttfa_p95_ms: float
    rtf_p50: float
    rtf_p95: float
    audio_seconds_per_second: float
    wall_seconds: float


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def one_request(client: Any, text: str, seed: int) -> Sample:
    body = {"text": text, "format": "pcm_f32le", "seed": seed}
    started = time.perf_counter()
    first: float | None = None
    size = 0
    async with client.stream("POST", "/v1/synthesize", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
        rate = int(response.headers["x-sample-rate"])
        async for chunk in response.aiter_raw():
            if first is None and chunk:
                first = time.perf_counter() - started
            size += len(chunk)
    wall = time.perf_counter() - started
    return Sample(ttfa=first or wall, wall=wall, audio_seconds=size / 4 / rate)


async def run_level(url: str, text: str, concurrency: int, requests: int) -> LevelResult:
    import httpx

    samples: list[Sample] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        await one_request(client, text, seed=10**6)

        async def loop() -> None:
            for seed in counter:
                samples.append(await one_request(client, text, seed))

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfas = [s.ttfa for s in samples]
    rtfs = [s.wall / s.audio_seconds for s in samples]
    return LevelResult(
        concurrency=concurrency,
        requests=len(samples),
        ttfa_p50_ms=1000 * statistics.median(ttfas),
        ttfa_p95_ms=1000 * percentile(ttfas, 0.95),
        rtf_p50=statistics.median(rtfs),
        rtf_p95=percentile(rtfs, 0.95),
        audio_seconds_per_second=sum(s.audio_seconds for s in samples) / wall,
        wall_seconds=wall,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def started_worker(max_concurrency: int, threads: int | None) -> Iterator[str]:
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "WORKER_PORT": str(port),
        "WORKER_MAX_CONCURRENCY": str(max_concurrency),
        "WORKER_MAX_QUEUE": "64",
        "WORKER_QUEUE_TIMEOUT_S": "300",
    }
    if threads:
        env["WORKER_THREADS"] = str(threads)
    process = subprocess.Popen([sys.executable, "-m", "worker"], cwd=REPO_ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("worker not ready after 120 s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def timed(action: object, repeat: int) -> list[float]:
    assert callable(action)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def measure_cleanup(repeat: int) -> None:
    """Per-request cost of gc.collect() and torch.cuda.empty_cache(), printed in ms."""
    import torch

    heap = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model=896, nhead=14, batch_first=True), num_layers=24
    )
    print(f"# {sum(p.numel() for p in heap.parameters()) / 1e6:.0f} M parameters on the heap")
    measure_gc_with_piper(repeat)
    if torch.cuda.is_available():
        measure_empty_cache(heap, repeat)
    else:
        print("no CUDA: torch.cuda.empty_cache() not measured")


def measure_gc_with_piper(repeat: int) -> None:
    import gc

    sys.path.insert(0, str(REPO_ROOT))
    try:
        from worker.engines import create_engine
        from worker.engines.base import EngineRequest

        engine = create_engine("piper")
    except ImportError as e:
        print(f"piper not installed ({e}); gc.collect() alone only")
        collect_only = timed(gc.collect, repeat)
        print(f"gc.collect(): {1000 * statistics.median(collect_only):.1f} ms "
              f"({len(gc.get_objects())} tracked objects)")
        return
    engine.load()
    engine.warm_up()
    request = EngineRequest(text=TWO_SENTENCES, voice="joe", speed=1.0, seed=1)
    synthesize = getattr(engine, "synthesize_all")  # noqa: B009 - piper-only helper
    plain = timed(lambda: synthesize(request), repeat)
    collected = timed(lambda: (synthesize(request), gc.collect()), repeat)
    collect_only = timed(gc.collect, repeat)
    print(f"piper request: {1000 * statistics.median(plain):.1f} ms; with gc.collect(): "
          f"{1000 * statistics.median(collected):.1f} ms; gc.collect() alone: "
          f"{1000 * statistics.median(collect_only):.1f} ms ({len(gc.get_objects())} tracked "
          f"objects; medians of {repeat})")


def measure_empty_cache(model: Any, repeat: int) -> None:
    import torch

    device = torch.device("cuda")
    model = model.to(device).half().eval()
    lengths = [200 + 37 * (i % 23) for i in range(repeat * 4)]

    def one(length: int, empty_cache: bool) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model(torch.randn(4, length, 896, device=device, dtype=torch.half))
        torch.cuda.synchronize()
        if empty_cache:
            torch.cuda.empty_cache()
        return time.perf_counter() - started

    for length in lengths:
        one(length, False)
    cached = [one(length, False) for length in lengths]
    emptied = [one(length, True) for length in lengths]
    again = [one(length, False) for length in lengths]
    print(f"GPU request ({torch.cuda.get_device_name()}, 24-layer fp16 encoder, batch 4, "
          f"200-1014 frames): {1000 * statistics.median(cached):.2f} ms, "
          f"{1000 * statistics.median(again):.2f} ms on a rerun; with empty_cache() after each: "
          f"{1000 * statistics.median(emptied):.2f} ms (medians of {len(lengths)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="target a running worker instead of starting one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=24, help="requests per level")
    parser.add_argument("--text", default=TWO_SENTENCES)
    parser.add_argument("--worker-concurrency", type=int, default=2,
                        help="WORKER_MAX_CONCURRENCY of a started worker")
    parser.add_argument("--threads", type=int, help="WORKER_THREADS of a started worker")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--cleanup", action="store_true",
                        help="measure per-request gc.collect()/empty_cache() costs instead")
    args = parser.parse_args()
    if args.cleanup:
        measure_cleanup(repeat=20)
        return 0
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        parser.error("benchmarks target loopback only")

    @contextmanager
    def target() -> Iterator[str]:
        if args.url:
            yield args.url
        else:
            with started_worker(args.worker_concurrency, args.threads) as url:
                yield url

    import httpx

    with target() as url:
        info = httpx.get(f"{url}/v1/info", timeout=10.0).json()
        print(f"# {info['engine']} {info['model']} ({info['model_version']}), "
              f"{len(args.text)} chars, {os.cpu_count()} CPUs", flush=True)
        if not args.json:
            print(f"{'conc':>4} {'reqs':>5} {'TTFA p50':>9} {'TTFA p95':>9} "
                  f"{'RTF p50':>8} {'RTF p95':>8} {'audio-s/s':>9}")
        for level in args.concurrency:
            load_before = os.getloadavg()[0]
            result = asyncio.run(run_level(url, args.text, level, args.requests))
            load = f"# host load average (1 min) {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
            if args.json:
                print(json.dumps({**asdict(result), "load": load}), flush=True)
            else:
                print(f"{result.concurrency:>4} {result.requests:>5} "
                      f"{result.ttfa_p50_ms:>7.0f}ms {result.ttfa_p95_ms:>7.0f}ms "
                      f"{result.rtf_p50:>8.3f} {result.rtf_p95:>8.3f} "
                      f"{result.audio_seconds_per_second:>9.1f}   {load}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
