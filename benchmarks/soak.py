"""Soak: a bounded run of mixed load against a whole cluster, with every status and RSS recorded.

    .venv/bin/python benchmarks/soak.py --minutes 10

It starts its own cluster with the launcher on free ports (2 gateways, 2 workers, Redis, nginx),
or targets a running one with `--url` (and `--run-dir`, whose pid files name the processes to
sample). Client threads keep requests in flight (a closed loop: a new request when one ends,
after a short pause), so the rate is what the machine sustains. The mix:

- `hit`: a few repeated phrases (cache hits after their first request; the bytes of every 200
  must equal the first answer's, across gateways and workers);
- `miss`: unique texts in every format;
- `stream`: a longer unique text streamed and read to its end;
- `disconnect`: a longer unique text whose client hangs up after the first chunk;
- `bad`: invalid input (empty, NUL, too long, unknown format, bad speed, bad JSON, unknown
  voice), each of which must get a 4xx;
- `info`: `GET /v1/models` and `GET /v1/voices`.

Before the clock starts, each worker is primed directly (two concurrent syntheses of Piper's
largest input, round after round until its RSS holds still): ONNX Runtime's arena grows in
100+ MiB steps the first times it meets them, a one-off cost that is not a leak. RSS (VmRSS;
nginx counts its master and workers) of every process is sampled every `--sample-s`; the
baseline is the first sample after the warm-up (`--warmup-s`), then the middle and the last
sample are compared with it.

Exit status 1 when any request got an unexpected answer: a 5xx other than 503 `busy` (which is
admission control, reported apart), a transport error, a 4xx for a valid request, a non-4xx for
an invalid one, or hit bytes that differ; or when a process grew after the warm-up by more than
`--rss-bound-mib` or `--rss-bound-pct` percent of its baseline, whichever is larger. Redis is
bounded instead by its `maxmemory` plus `--rss-bound-mib`: cached audio may fill it by design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis
from soak_mix import Outcome, run_one
from soak_rss import RssRow, RssSample, prime_workers, rss_verdict, sample_rss

from cluster import launcher
from cluster.probes import port_free
from cluster.settings import REPO_ROOT, ClusterSettings


def _free_block(count: int, start: int) -> int:
    port = start
    while not all(port_free("127.0.0.1", port + i) for i in range(count)):
        port += count
    return port


@contextmanager
def own_cluster(gateways: int, workers: int) -> Iterator[ClusterSettings]:
    run_dir = Path(tempfile.mkdtemp(prefix="tts-soak-"))
    run_dir.chmod(0o755)
    settings = ClusterSettings(
        run_dir=run_dir,
        gateways=gateways,
        workers=workers,
        public_port=_free_block(1, 38080),
        internal_port=_free_block(1, 38180),
        h2c_port=_free_block(1, 38280),
        gateway_base_port=_free_block(gateways, 39000),
        worker_base_port=_free_block(workers, 39100),
        redis_port=_free_block(1, 36380),
    )
    try:
        launcher.up(settings)
        yield settings
    finally:
        launcher.down(settings)
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Tally:
    outcomes: list[Outcome]
    lock: threading.Lock
    hit_digests: dict[str, str]

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def check_hit_bytes(self, phrase_key: str, body: bytes) -> bool:
        """True when `body` equals the first 200 seen for this phrase and format."""
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            return self.hit_digests.setdefault(phrase_key, digest) == digest


def client_loop(url: str, tally: Tally, deadline: float, seed: int, pause_s: float) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as client:
        counter = 0
        while time.monotonic() < deadline:
            counter += 1
            tally.add(run_one(client, url, rng, f"{seed}-{counter}", tally.check_hit_bytes))
            time.sleep(pause_s * rng.random() * 2)


@dataclass
class SoakRun:
    started_utc: str
    minutes: float
    clients: int
    url: str
    gateways: int
    workers: int
    priming_rounds: dict[str, int]
    host_load_1m: list[float]
    outcomes: list[Outcome]
    samples: list[RssSample]
    points: tuple[RssSample, RssSample, RssSample]
    rss: dict[str, RssRow]


def soak(settings: ClusterSettings, args: argparse.Namespace) -> SoakRun:
    url = args.url or settings.public_url
    started = datetime.now(UTC).isoformat(timespec="seconds")
    primed = prime_workers(settings)
    store = redis.Redis.from_url(settings.redis_url)
    maxmemory = int(str(store.config_get("maxmemory")["maxmemory"]))
    store.close()
    tally = Tally([], threading.Lock(), {})
    start = time.monotonic()
    deadline = start + args.minutes * 60
    clients = [
        threading.Thread(
            target=client_loop, args=(url, tally, deadline, seed, args.pause_s), daemon=True
        )
        for seed in range(args.clients)
    ]
    for thread in clients:
        thread.start()
    samples: list[RssSample] = []
    loads: list[float] = []
    while any(thread.is_alive() for thread in clients):
        samples.append(RssSample(round(time.monotonic() - start, 1), sample_rss(settings)))
        loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
        time.sleep(min(args.sample_s, max(0.1, deadline - time.monotonic() + 1)))
    for thread in clients:
        thread.join()
    samples.append(RssSample(round(time.monotonic() - start, 1), sample_rss(settings)))
    warm = [sample for sample in samples if sample.t_s >= args.warmup_s] or samples[-1:]
    halfway = (warm[0].t_s + warm[-1].t_s) / 2
    middle = min(warm, key=lambda sample: abs(sample.t_s - halfway))
    points = (warm[0], middle, warm[-1])
    return SoakRun(
        started_utc=started,
        minutes=args.minutes,
        clients=args.clients,
        url=url,
        gateways=settings.gateways,
        workers=settings.workers,
        priming_rounds=primed,
        host_load_1m=loads,
        outcomes=tally.outcomes,
        samples=samples,
        points=points,
        rss=rss_verdict(points, args.rss_bound_mib, args.rss_bound_pct, maxmemory),
    )


@dataclass(frozen=True)
class StatusRow:
    kind: str
    status: int
    code: str
    expected: bool
    count: int


@dataclass(frozen=True)
class Summary:
    requests: int
    requests_per_s: float
    unexpected: int
    unexpected_5xx: int
    busy_503: int
    transport_errors: int
    rss_ok: bool
    statuses: list[StatusRow]

    @property
    def passed(self) -> bool:
        return self.unexpected == 0 and self.rss_ok


def summarize(run: SoakRun) -> Summary:
    outcomes = run.outcomes
    counts = Counter((o.kind, o.status, o.code, o.expected) for o in outcomes)
    return Summary(
        requests=len(outcomes),
        requests_per_s=round(len(outcomes) / (run.minutes * 60), 2),
        unexpected=sum(1 for o in outcomes if not o.expected),
        unexpected_5xx=sum(1 for o in outcomes if not o.expected and o.status >= 500),
        busy_503=sum(1 for o in outcomes if o.expected and o.status == 503),
        transport_errors=sum(1 for o in outcomes if o.status == 0),
        rss_ok=all(row.ok for row in run.rss.values()),
        statuses=[StatusRow(*key, count) for key, count in sorted(counts.items())],
    )


def print_tables(run: SoakRun, summary: Summary) -> None:
    print(f"{'kind':<11} {'status':>6} {'code':<30} {'expected':<8} {'count':>6}")
    for row in summary.statuses:
        expected = "yes" if row.expected else "NO"
        print(f"{row.kind:<11} {row.status:>6} {row.code[:30]:<30} {expected:<8} {row.count:>6}")
    times = " / ".join(f"{point.t_s:.0f} s" for point in run.points)
    print(f"\nRSS MiB at baseline / middle / end ({times})")
    print(f"{'process':<11} {'baseline':>9} {'middle':>9} {'end':>9} {'growth':>8}  limit")
    for name, rss in run.rss.items():
        print(
            f"{name:<11} {rss.baseline_mib:>9} {rss.middle_mib:>9} {rss.end_mib:>9} "
            f"{rss.growth_mib:>8}  {rss.limit_mib} ({rss.rule}) "
            f"{'ok' if rss.ok else 'EXCEEDED'}"
        )
    loads = run.host_load_1m
    print(
        f"\n{summary.requests} requests in {run.minutes:g} min ({summary.requests_per_s}/s), "
        f"{summary.unexpected} unexpected ({summary.unexpected_5xx} 5xx, "
        f"{summary.transport_errors} transport errors), {summary.busy_503} busy 503; "
        f"host load (1 min) {min(loads):.1f}-{max(loads):.1f}, "
        f"mean {sum(loads) / len(loads):.1f}; priming rounds {run.priming_rounds}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    parser.add_argument("--clients", type=int, default=3, help="client threads (closed loop)")
    parser.add_argument("--pause-s", type=float, default=0.2, help="mean pause between requests")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="seconds before baseline")
    parser.add_argument("--sample-s", type=float, default=15.0, help="RSS sampling period")
    parser.add_argument("--rss-bound-mib", type=float, default=64.0)
    parser.add_argument("--rss-bound-pct", type=float, default=10.0)
    parser.add_argument("--gateways", type=int, default=2, help="own cluster only")
    parser.add_argument("--workers", type=int, default=2, help="own cluster only")
    parser.add_argument("--url", help="public URL of a running cluster (instead of starting one)")
    parser.add_argument(
        "--run-dir", type=Path, default=REPO_ROOT / "run", help="that cluster's run directory"
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "bench-results" / f"soak-{stamp}.json"
    )
    args = parser.parse_args()
    if args.url:
        report = soak(launcher.running_settings(ClusterSettings(run_dir=args.run_dir)), args)
    else:
        with own_cluster(args.gateways, args.workers) as settings:
            report = soak(settings, args)
    summary = summarize(report)
    print_tables(report, summary)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {"summary": asdict(summary), "passed": summary.passed, **asdict(report)}
    args.output.write_text(json.dumps(document, indent=1) + "\n")
    print(f"report: {args.output}")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
