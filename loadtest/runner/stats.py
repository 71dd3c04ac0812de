"""Per-request samples and the figures of one (target, concurrency) level."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from contract.playback import UNDERRUN_THRESHOLD_S

PERCENTILES = (50.0, 95.0, 99.0)


@dataclass(frozen=True)
class Sample:
    """One finished request, as the client saw it.

    `status` is the HTTP status, or 0 when no response came (`error` then names the failure).
    A request is ok only with a 2xx status, a complete body and decodable audio.
    """

    status: int
    latency_s: float
    ttfa_s: float | None = None
    audio_s: float = 0.0
    cache: str | None = None
    error: str | None = None
    worst_gap_s: float | None = None  # longest wait behind playback; None when not measured

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class CacheSplit:
    """Time to first audio and latency of the ok requests with one X-Cache value."""

    ttfa_s: Distribution
    latency_s: Distribution


@dataclass
class LevelResult:
    """The figures of one target at one concurrency. Rates are per second of wall time."""

    target: str
    concurrency: int
    elapsed_s: float
    requests: int
    ok: int
    errors: int
    error_rate: float
    errors_by_status: dict[str, int]
    errors_by_code: dict[str, int]
    requests_per_s: float
    audio_seconds_per_s: float
    audio_seconds: float
    ttfa_s: Distribution
    latency_s: Distribution
    rtf: Distribution
    cache_hit_ratio: float | None
    worst_gap_s: Distribution = field(default_factory=lambda: distribution([]))
    without_underrun_ratio: float | None = None  # share of measured streams never >100 ms behind
    cache: dict[str, int] = field(default_factory=dict)
    by_cache: dict[str, CacheSplit] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks.

    Matches numpy's default ("linear") method. Raises ValueError on no values or a bad q.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile {q} is not between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> Distribution:
    if not values:
        return Distribution(count=0, mean=None, p50=None, p95=None, p99=None, max=None)
    p50, p95, p99 = (percentile(values, q) for q in PERCENTILES)
    return Distribution(
        count=len(values),
        mean=sum(values) / len(values),
        p50=p50,
        p95=p95,
        p99=p99,
        max=max(values),
    )


def summarize(
    target: str, concurrency: int, samples: Sequence[Sample], elapsed_s: float
) -> LevelResult:
    """Figures of one level from its samples; `elapsed_s` is the level's wall time.

    Time to first audio, latency and real-time factor (latency / audio seconds) count ok
    requests only, and are split again by `X-Cache` value in `by_cache` (a mix of hits and
    misses has two very different latencies); the cache hit ratio counts responses with an
    `X-Cache` of HIT or MISS (BYPASS and absent headers are left out; None when there are
    none). `worst_gap_s` is the distribution of each ok stream's longest wait behind playback
    and `without_underrun_ratio` the share never more than 100 ms behind (contract.playback),
    over the streams whose format allows it (None when none did).
    """
    if elapsed_s <= 0:
        raise ValueError("elapsed_s must be positive")
    ok = [s for s in samples if s.ok]
    failed = [s for s in samples if not s.ok]
    by_status = Counter(str(s.status) if s.status else "no_response" for s in failed)
    by_code = Counter(s.error or "unknown" for s in failed)
    cache = Counter(s.cache for s in samples if s.cache)
    looked_up = cache.get("HIT", 0) + cache.get("MISS", 0)
    audio_total = sum(s.audio_s for s in ok)
    gaps = [s.worst_gap_s for s in ok if s.worst_gap_s is not None]
    return LevelResult(
        target=target,
        concurrency=concurrency,
        elapsed_s=elapsed_s,
        requests=len(samples),
        ok=len(ok),
        errors=len(failed),
        error_rate=len(failed) / len(samples) if samples else 0.0,
        errors_by_status=dict(sorted(by_status.items())),
        errors_by_code=dict(sorted(by_code.items())),
        requests_per_s=len(ok) / elapsed_s,
        audio_seconds_per_s=audio_total / elapsed_s,
        audio_seconds=audio_total,
        ttfa_s=distribution([s.ttfa_s for s in ok if s.ttfa_s is not None]),
        latency_s=distribution([s.latency_s for s in ok]),
        rtf=distribution([s.latency_s / s.audio_s for s in ok if s.audio_s > 0]),
        cache_hit_ratio=cache.get("HIT", 0) / looked_up if looked_up else None,
        worst_gap_s=distribution(gaps),
        without_underrun_ratio=(
            sum(gap <= UNDERRUN_THRESHOLD_S for gap in gaps) / len(gaps) if gaps else None
        ),
        cache=dict(sorted(cache.items())),
        by_cache={
            value: CacheSplit(
                ttfa_s=distribution([s.ttfa_s for s in ok if s.cache == value and s.ttfa_s]),
                latency_s=distribution([s.latency_s for s in ok if s.cache == value]),
            )
            for value in sorted({s.cache for s in ok if s.cache})
        },
    )
