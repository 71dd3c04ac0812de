"""The gateway's cache-hit path against its floor, side by side in one run.

Starts redis-server, one Piper worker (only to prime the cache and report capabilities), one
gateway and the floor app (`floor_app.py`: a raw ASGI app on Hypercorn that serves the same
bytes with one Redis GET). Then, at each concurrency, wrk (one thread, keep-alive) sends the
same cached `POST /v1/audio/speech` to the gateway and the same POST to the floor, in
alternating order, and reports p50/p99 latency and requests/s.

Targets at concurrency 16: gateway throughput >= 0.67x the floor's, p99 <= 1.5x the floor's.

    .venv/bin/python benchmarks/bench_gateway_hits.py --duration 8 --out /tmp/hits.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from gateway.cache import decode_entry  # noqa: E402
from testbed.processes import (  # noqa: E402
    RunningProcess,
    free_port,
    http_ok,
    python_service,
    redis_server,
    wait_until_ready,
)

BODY = {
    "model": "tts-1",
    "input": "Served from the cache.",
    "voice": "alloy",
    "response_format": "wav",
}
FLOOR_KEY = "floor:audio"
THROUGHPUT_TARGET = 0.67
P99_TARGET = 1.5
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@contextmanager
def floor_app(redis_port: int, log_dir: Path) -> Iterator[RunningProcess]:
    port = free_port()
    log_path = log_dir / "floor.log"
    env = {
        **os.environ,
        "FLOOR_PORT": str(port),
        "FLOOR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FLOOR_KEY": FLOOR_KEY,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "benchmarks" / "floor_app.py")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = RunningProcess(process=process, port=port, log_path=log_path)
    try:
        wait_until_ready(lambda: http_ok(f"{running.url}/readyz"), process, log_path, 30)
        yield running
    finally:
        running.stop()


def wrk(url: str, connections: int, duration: float, script: Path) -> dict[str, float]:
    """One wrk run; p50/p99 in ms, requests/s, and errors (non-2xx plus socket errors)."""
    seconds = max(1, round(duration))
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script)]
    out = subprocess.run(
        [*command, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}_ms"] = float(value) * _UNITS[unit]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    result["errors"] = float(non_2xx.group(1) if non_2xx else 0) + float(
        sum(int(n) for n in sockets.groups()) if sockets else 0
    )
    return result


def write_script(folder: Path) -> Path:
    script = folder / "hit.lua"
    payload = json.dumps(BODY).replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{payload}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def prime(gateway_url: str, redis_port: int) -> int:
    """Fill the cache through the gateway, copy the audio to the floor's key; its size."""
    with httpx.Client(base_url=gateway_url, timeout=60) as client:
        first = client.post("/v1/audio/speech", json=BODY)
        first.raise_for_status()
        second = client.post("/v1/audio/speech", json=BODY)
        if second.headers.get("X-Cache") != "HIT" or second.content != first.content:
            raise RuntimeError("the gateway did not answer the repeat from its cache")
    store = redis.Redis(port=redis_port)
    entry = decode_entry(store.get(second.headers["X-Cache-Key"]))  # type: ignore[arg-type]
    store.set(FLOOR_KEY, entry.audio, ex=3600)
    return len(entry.audio)


def gateway_cache_metrics(gateway_url: str) -> dict[str, float]:
    """The gateway's cache counters: shows whether every benchmark request was really a hit."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        if line.startswith(("gateway_cache_", "gateway_upstream_attempts_total")) and (
            "_created" not in line
        ):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured load first"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hits-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        store = stack.enter_context(redis_server(root / "redis"))
        worker_port = free_port()
        worker = stack.enter_context(
            python_service(
                "worker",
                {"WORKER_PORT": str(worker_port), "WORKER_THREADS": "1"},
                port=worker_port,
                log_dir=root,
                timeout=180,
            )
        )
        gateway_port = free_port()
        gateway = stack.enter_context(
            python_service(
                "gateway",
                {
                    "GATEWAY_PORT": str(gateway_port),
                    "GATEWAY_WORKER_URL": worker.url,
                    "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{store.port}/0",
                },
                port=gateway_port,
                log_dir=root,
            )
        )
        floor = stack.enter_context(floor_app(store.port, root))
        try:
            size = prime(gateway.url, store.port)
        except (httpx.HTTPError, RuntimeError):
            print(gateway.log()[-4000:], worker.log()[-4000:], sep="\n", file=sys.stderr)
            raise
        script = write_script(root)
        targets = {
            "gateway": f"{gateway.url}/v1/audio/speech",
            "floor": f"{floor.url}/v1/audio/speech",
        }
        rows = []
        for index, connections in enumerate(args.concurrency):
            order = list(targets) if index % 2 == 0 else list(reversed(targets))
            for name in order:
                wrk(targets[name], connections, args.warmup, script)
                result = wrk(targets[name], connections, args.duration, script)
                rows.append({"target": name, "concurrency": connections, **result})
                print(
                    f"{name:8} c={connections:<3} {result['rps']:9.1f} req/s  "
                    f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                    f"errors {int(result['errors'])}",
                    flush=True,
                )
        cache_metrics = gateway_cache_metrics(gateway.url)
    report = {
        "body_bytes": size,
        "duration_s": args.duration,
        "results": rows,
        "gateway_cache_metrics": cache_metrics,
    }
    by = {(r["target"], r["concurrency"]): r for r in rows}
    if ("gateway", 16) in by and ("floor", 16) in by:
        gw, fl = by[("gateway", 16)], by[("floor", 16)]
        report["c16"] = {
            "throughput_ratio": gw["rps"] / fl["rps"],
            "p99_ratio": gw["p99_ms"] / fl["p99_ms"],
            "throughput_ok": gw["rps"] / fl["rps"] >= THROUGHPUT_TARGET,
            "p99_ok": gw["p99_ms"] / fl["p99_ms"] <= P99_TARGET,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
