"""What nginx and a gateway add to time to first audio (TTFA) and total latency.

The same requests go (a) through nginx's public listener and a gateway, with the cache bypassed
(`Cache-Control: no-store`) so both paths synthesize, and (b) straight to a worker's
`POST /v1/synthesize`. Requests run one at a time, alternating which path goes first, against a
cluster of one gateway and one worker, so both paths reach the same worker and only the stack
in front of it differs.

    .venv/bin/python benchmarks/bench_stack_overhead.py --requests 200

It starts its own cluster on free ports (or takes --public-url and --worker-url of a running one)
and prints a JSON report: p50/p99 per path and the added milliseconds, also per pair. On its own
cluster it also times the hops alone (a gateway called directly; nginx's internal listener in
front of the worker), to show where added time comes from. With
`--stub-worker` the worker is a stand-in that answers at once with fixed audio
(testbed/stub_worker.py): synthesis time and its spread drop out, and what remains is the
cost of nginx (twice) and the gateway.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from cluster import launcher
from cluster.probes import port_free
from cluster.settings import ClusterSettings

# Short texts keep synthesis time, and its spread, small next to what is being measured.
TEXTS = ["Hi.", "Yes.", "Okay.", "Thanks."]
TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0


@dataclass(frozen=True)
class Timing:
    ttfa_ms: float
    total_ms: float
    audio_bytes: int


def timed_stream(client: httpx.Client, url: str, **kwargs: object) -> Timing:
    start = time.perf_counter()
    first: float | None = None
    size = 0
    with client.stream("POST", url, **kwargs) as response:  # type: ignore[arg-type]
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.read()[:200]!r}")
        for chunk in response.iter_raw():
            if chunk and first is None:
                first = time.perf_counter()
            size += len(chunk)
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: empty body")
    return Timing((first - start) * 1000, (end - start) * 1000, size)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 2),
        "p99": round(percentile(values, 99), 2),
        "mean": round(statistics.fmean(values), 2),
    }


def _free_block(count: int, start: int) -> int:
    port = start
    while not all(port_free("127.0.0.1", port + i) for i in range(count)):
        port += count
    return port


@dataclass(frozen=True)
class Endpoints:
    public: str
    worker: str
    # Known only for a cluster this script starts: the hops in between, for the breakdown.
    internal: str | None = None
    gateway: str | None = None


@contextmanager
def own_cluster(worker_module: str) -> Iterator[Endpoints]:
    run_dir = Path(tempfile.mkdtemp(prefix="tts-bench-"))
    run_dir.chmod(0o755)
    settings = ClusterSettings(
        run_dir=run_dir,
        gateways=1,
        workers=1,
        worker_module=worker_module,
        public_port=_free_block(1, 28080),
        internal_port=_free_block(1, 28180),
        h2c_port=_free_block(1, 28280),
        gateway_base_port=_free_block(1, 29000),
        worker_base_port=_free_block(1, 29100),
        redis_port=_free_block(1, 26380),
        rate_per_addr="10000r/s",
        burst_per_addr=10000,
    )
    try:
        launcher.up(settings)
        yield Endpoints(
            public=settings.public_url,
            worker=f"http://127.0.0.1:{settings.worker_base_port}",
            internal=settings.internal_url,
            gateway=f"http://127.0.0.1:{settings.gateway_base_port}",
        )
    finally:
        launcher.down(settings)
        shutil.rmtree(run_dir, ignore_errors=True)


Call = Callable[[str], Timing]


def _calls(client: httpx.Client, endpoints: Endpoints) -> dict[str, Call]:
    """Every path to time, by name: `stack` and `direct` always, the hops when known."""

    def speech(base: str) -> Call:
        return lambda text: timed_stream(
            client,
            f"{base}/v1/audio/speech",
            json={"model": "tts-1", "input": text, "response_format": "pcm"},
            headers={"Cache-Control": "no-store"},
        )

    def synthesize(base: str) -> Call:
        return lambda text: timed_stream(
            client, f"{base}/v1/synthesize", json={"text": text, "format": "pcm"}
        )

    calls = {"stack": speech(endpoints.public), "direct": synthesize(endpoints.worker)}
    if endpoints.gateway:
        calls["gateway_only"] = speech(endpoints.gateway)
    if endpoints.internal:
        calls["internal_nginx_only"] = synthesize(endpoints.internal)
    return calls


def run(endpoints: Endpoints, requests: int, warmup: int) -> dict[str, object]:
    with httpx.Client(timeout=120) as client:
        calls = _calls(client, endpoints)
        timings: dict[str, list[Timing]] = {name: [] for name in calls}
        for index in range(warmup + requests):
            text = TEXTS[index % len(TEXTS)]
            names = list(calls)
            # Rotate the order, so that no path always goes first.
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                timing = calls[name](text)
                if index >= warmup:
                    timings[name].append(timing)
    direct = timings["direct"]
    stack_ttfa = summary([t.ttfa_ms for t in timings["stack"]])
    direct_ttfa = summary([t.ttfa_ms for t in direct])
    added_p50 = round(stack_ttfa["p50"] - direct_ttfa["p50"], 2)
    added_p99 = round(stack_ttfa["p99"] - direct_ttfa["p99"], 2)
    return {
        "requests_per_path": requests,
        "ttfa_ms": {name: summary([t.ttfa_ms for t in ts]) for name, ts in timings.items()},
        "total_ms": {name: summary([t.total_ms for t in ts]) for name, ts in timings.items()},
        "added_ttfa_ms": {"p50": added_p50, "p99": added_p99},
        "added_ttfa_ms_per_pair": {
            name: summary([t.ttfa_ms - d.ttfa_ms for t, d in zip(ts, direct, strict=True)])
            for name, ts in timings.items()
            if name != "direct"
        },
        "targets_ms": {"p50": TARGET_P50_MS, "p99": TARGET_P99_MS},
        "meets_targets": added_p50 <= TARGET_P50_MS and added_p99 <= TARGET_P99_MS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per path")
    parser.add_argument("--public-url", help="nginx's public URL of a running cluster")
    parser.add_argument("--worker-url", help="a worker of that cluster, called directly")
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--stub-worker",
        action="store_true",
        help="run testbed/stub_worker.py (fixed audio, no synthesis) as the worker, so that "
        "only the stack's own cost remains",
    )
    args = parser.parse_args()
    if bool(args.public_url) != bool(args.worker_url):
        parser.error("give both --public-url and --worker-url, or neither")
    if args.public_url:
        report = run(Endpoints(args.public_url, args.worker_url), args.requests, args.warmup)
    else:
        module = "testbed.stub_worker" if args.stub_worker else "worker"
        with own_cluster(module) as endpoints:
            report = run(endpoints, args.requests, args.warmup)
        report["worker"] = module
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
