"""Resident memory of a cluster's processes for the soak: sampling, priming, the verdict.

Used by `benchmarks/soak.py` (see its docstring for the bounds).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from cluster import launcher
from cluster.settings import ClusterSettings

MIB = 1024 * 1024
PRIME_TEXT = " ".join(["and the listener keeps on reading every word"] * 12) + "."


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def sample_rss(settings: ClusterSettings) -> dict[str, int]:
    """VmRSS in bytes of every recorded process (nginx: its master plus its workers)."""
    sample = {}
    for name, record in launcher.load_records(settings).items():
        if not record.alive():
            sample[name] = 0
            continue
        pids = [record.pid, *(_children(record.pid) if name == "nginx" else [])]
        sample[name] = sum(_rss(pid) for pid in pids)
    return sample


def prime_workers(settings: ClusterSettings, rounds: int = 6) -> dict[str, int]:
    """Two concurrent syntheses of Piper's largest input on each worker, round after round,
    until no worker's RSS rises by a MiB in a round; returns the rounds each took.

    ONNX Runtime's arena grows in 100+ MiB steps the first times it meets that input or a
    second concurrent run: a one-off cost of the engine that a baseline must already include.
    """
    records = {
        name: record
        for name, record in launcher.load_records(settings).items()
        if name.startswith("worker-")
    }
    taken = {}
    with httpx.Client(timeout=120) as client:
        for name, record in records.items():
            url = f"http://127.0.0.1:{record.port}/v1/synthesize"
            for index in range(rounds):
                before = _rss(record.pid)
                with ThreadPoolExecutor(max_workers=2) as pool:
                    bodies = [
                        {"text": f"{PRIME_TEXT} {index} {n}.", "format": "pcm"} for n in range(2)
                    ]
                    posts = [pool.submit(client.post, url, json=body) for body in bodies]
                    for post in posts:
                        post.result().raise_for_status()
                taken[name] = index + 1
                if _rss(record.pid) - before < MIB:
                    break
    return taken


@dataclass(frozen=True)
class RssSample:
    t_s: float
    rss: dict[str, int]


@dataclass(frozen=True)
class RssRow:
    baseline_mib: float
    middle_mib: float
    end_mib: float
    growth_mib: float
    limit_mib: float
    rule: str
    ok: bool


def rss_verdict(
    points: tuple[RssSample, RssSample, RssSample],
    bound_mib: float,
    bound_pct: float,
    redis_maxmemory: int,
) -> dict[str, RssRow]:
    """Each process's baseline, middle and end RSS, and whether the end is within its bound."""
    baseline, middle, end = points
    verdict = {}
    for name, start in baseline.rss.items():
        last = end.rss.get(name, 0)
        if name == "redis":
            limit = redis_maxmemory + bound_mib * MIB
            rule = f"<= maxmemory + {bound_mib:.0f} MiB"
        else:
            limit = start + max(bound_mib * MIB, start * bound_pct / 100)
            rule = f"growth <= max({bound_mib:.0f} MiB, {bound_pct:.0f}%)"
        verdict[name] = RssRow(
            baseline_mib=round(start / MIB, 1),
            middle_mib=round(middle.rss.get(name, 0) / MIB, 1),
            end_mib=round(last / MIB, 1),
            growth_mib=round((last - start) / MIB, 1),
            limit_mib=round(limit / MIB, 1),
            rule=rule,
            ok=0 < last <= limit,
        )
    return verdict
