"""The concurrency sweep: closed-loop load on each target, level by level, side by side."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from loadtest.runner.probe import measure
from loadtest.runner.stats import LevelResult, Sample, summarize
from loadtest.runner.targets import Target
from loadtest.runner.texts import TextMode, TextSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPlan:
    """What to run. Every level is bounded both in time and in request count."""

    targets: tuple[Target, ...]
    concurrency: tuple[int, ...]
    duration_s: float
    max_requests: int
    timeout_s: float
    pool_size: int
    repeat_ratio: float
    seed: int
    run_id: str
    prime: bool
    api_key: str | None


async def run_level(
    target: Target,
    concurrency: int,
    source: TextSource,
    plan: SweepPlan,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LevelResult:
    """`concurrency` clients, each sending its next request as soon as the last one ends.

    No request starts after `duration_s` or beyond `max_requests`; requests in flight then
    finish (each within `timeout_s`) and count.
    """
    samples: list[Sample] = []
    budget = plan.max_requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        timeout=plan.timeout_s, limits=limits, transport=transport
    ) as client:
        started = time.perf_counter()
        deadline = started + plan.duration_s

        async def user() -> None:
            nonlocal budget
            while budget > 0 and time.perf_counter() < deadline:
                budget -= 1
                samples.append(await measure(client, target, source.next_text(), plan.api_key))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarize(target.label, concurrency, samples, elapsed)


async def prime(
    target: Target,
    source: TextSource,
    plan: SweepPlan,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Request every pool phrase once, unmeasured, so repeated phrases are cache hits.

    Returns the number of phrases that failed; unique-text targets are left alone.
    """
    if target.texts is TextMode.UNIQUE:
        return 0
    failures = 0
    async with httpx.AsyncClient(timeout=plan.timeout_s, transport=transport) as client:
        for phrase in source.pool:
            sample = await measure(client, target, phrase, plan.api_key)
            if not sample.ok:
                failures += 1
    return failures


async def run_sweep(
    plan: SweepPlan,
    on_level: Callable[[LevelResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[LevelResult]:
    """Run every level on every target, alternating the target order from level to level.

    Targets take turns at each level (A then B, then B then A at the next level), so drift on
    a shared machine does not always favour the same target. `transport` replaces the
    network (for tests).
    """
    sources = {
        target.label: TextSource(
            target.texts,
            run_id=f"{plan.run_id}{index}",
            pool_size=plan.pool_size,
            repeat_ratio=plan.repeat_ratio,
            seed=plan.seed + index,
        )
        for index, target in enumerate(plan.targets)
    }
    if plan.prime:
        for target in plan.targets:
            failures = await prime(target, sources[target.label], plan, transport)
            if failures:
                log.warning("priming %s: %d phrases failed", target.label, failures)
    results: list[LevelResult] = []
    for level_index, concurrency in enumerate(plan.concurrency):
        order: Sequence[Target] = (
            plan.targets if level_index % 2 == 0 else tuple(reversed(plan.targets))
        )
        for target in order:
            result = await run_level(target, concurrency, sources[target.label], plan, transport)
            results.append(result)
            if on_level is not None:
                on_level(result)
    return results
