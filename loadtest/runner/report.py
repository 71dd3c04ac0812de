"""The run's JSON document and the table printed while it runs."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest.runner.stats import LevelResult
from loadtest.runner.sweep import SweepPlan

SCHEMA = "loadtest.runner/1"

HEADER = (
    f"{'target':<12} {'conc':>4} {'reqs':>5} {'err':>4} {'req/s':>7} {'audio-s/s':>9} "
    f"{'ttfa p50':>8} {'p95':>6} {'p99':>6} {'lat p50':>7} {'p95':>6} {'rtf p50':>7} {'hit%':>5} "
    f"{'gap p50':>7} {'p99':>6} {'smooth%':>7}"
)
"""`gap`: each stream's longest wait behind playback; `smooth%`: streams never >100 ms behind."""


def document(
    plan: SweepPlan, results: Sequence[LevelResult], started_at: datetime
) -> dict[str, Any]:
    """The JSON written for a run: plan, machine, and one entry per (target, level)."""
    plan_json = asdict(plan)
    plan_json.pop("api_key")
    return {
        "schema": SCHEMA,
        "run_id": plan.run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "plan": plan_json,
        "levels": [result.to_json() for result in results],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def table_row(result: LevelResult) -> str:
    hit = "-" if result.cache_hit_ratio is None else f"{100 * result.cache_hit_ratio:.0f}"
    smooth = _percent(result.without_underrun_ratio)
    return (
        f"{result.target[:12]:<12} {result.concurrency:>4} {result.requests:>5} "
        f"{result.errors:>4} {result.requests_per_s:>7.2f} {result.audio_seconds_per_s:>9.2f} "
        f"{_ms(result.ttfa_s.p50):>8} {_ms(result.ttfa_s.p95):>6} {_ms(result.ttfa_s.p99):>6} "
        f"{_ms(result.latency_s.p50):>7} {_ms(result.latency_s.p95):>6} "
        f"{_num(result.rtf.p50):>7} {hit:>5} "
        f"{_ms(result.worst_gap_s.p50):>7} {_ms(result.worst_gap_s.p99):>6} {smooth:>7}"
    )


def error_line(result: LevelResult) -> str | None:
    if not result.errors:
        return None
    statuses = ", ".join(f"{k}: {v}" for k, v in result.errors_by_status.items())
    codes = ", ".join(f"{k}: {v}" for k, v in result.errors_by_code.items())
    return f"  {result.target} c={result.concurrency} errors by status {{{statuses}}} ({codes})"


def cache_line(result: LevelResult) -> str | None:
    """Latency by X-Cache value, when a level mixes several (hits and misses)."""
    if len(result.by_cache) < 2:
        return None
    parts = [
        f"{value} n={split.latency_s.count} ttfa p50 {_ms(split.ttfa_s.p50)} "
        f"lat p50 {_ms(split.latency_s.p50)} p95 {_ms(split.latency_s.p95)}"
        for value, split in result.by_cache.items()
    ]
    return f"  {result.target} c={result.concurrency} by X-Cache: " + "; ".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}ms"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.0f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
