"""Command line of the benchmark runner: arguments, their bounds, and the target check."""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from loadtest.runner.sweep import SweepPlan
from loadtest.runner.targets import TARGET_KEYS, Target, TargetSpecError, parse_target
from loadtest.runner.texts import PHRASES

MAX_TARGETS = 4
MAX_LEVELS = 16
MAX_CONCURRENCY = 512
MAX_DURATION_S = 600.0
MAX_REQUESTS = 100_000
MAX_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 5.0

EPILOG = """\
targets are comma-separated key=value pairs; only url is required:
  url=http://127.0.0.1:8080   base URL of a gateway, nginx or worker
  api=openai|seed|worker      POST /v1/audio/speech, POST /synthesize, POST /v1/synthesize
  texts=mix|repeat|unique     pool phrases and unique texts, pool only, unique only
  cache=use|bypass            bypass sends Cache-Control: no-cache
  label=NAME format=FMT voice=ID model=NAME

recipes:
  nginx vs worker:  --target label=nginx,url=http://127.0.0.1:8080
                    --target label=worker,url=http://127.0.0.1:9100,api=worker
  hit vs miss:      --prime --target label=hit,url=http://127.0.0.1:8080,texts=repeat
                    --target label=miss,url=http://127.0.0.1:8080,texts=unique
  1 vs 2 workers:   --target label=one,url=http://127.0.0.1:9100,api=worker,texts=unique
                    --target label=two,url=http://127.0.0.1:8081,api=worker,texts=unique
"""


@dataclass(frozen=True)
class Options:
    plan: SweepPlan
    out: Path
    plot: bool
    check_ready: bool
    verbose: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.runner",
        description="Concurrency sweep over one to four speech targets, side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="SPEC",
        help="a target (repeat for a side-by-side comparison)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,2,4",
        metavar="N,N,...",
        help="concurrency levels (default: 1,2,4)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds per level and target (default: 10)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=200,
        metavar="N",
        help="requests per level and target at most (default: 200)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="per-request timeout in seconds (default: 60)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=8,
        metavar="N",
        help=f"repeated phrases, 1 to {len(PHRASES)} (default: 8)",
    )
    parser.add_argument(
        "--repeat-ratio",
        type=float,
        default=0.8,
        metavar="R",
        help="share of pool phrases for texts=mix (default: 0.8)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for text choice")
    parser.add_argument(
        "--prime", action="store_true", help="request each pool phrase once before measuring"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BENCH_API_KEY"),
        help="bearer token (default: $BENCH_API_KEY)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PREFIX",
        help="writes PREFIX.json and PREFIX.png (default: bench-results/bench-<UTC time>)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write JSON only")
    parser.add_argument(
        "--no-ready-check", action="store_true", help="skip the GET /readyz check of each target"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse and bound every argument; a bad one exits with status 2 and says why."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.target:
        parser.error(
            "no target: give --target url=http://HOST:PORT (once, or twice to compare); "
            f"target keys: {', '.join(TARGET_KEYS)}"
        )
    if len(args.target) > MAX_TARGETS:
        parser.error(f"at most {MAX_TARGETS} targets, got {len(args.target)}")
    targets: list[Target] = []
    for index, spec in enumerate(args.target):
        try:
            targets.append(parse_target(spec, index))
        except TargetSpecError as e:
            parser.error(f"--target {spec!r}: {e}")
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        parser.error(f"target labels must differ, got {', '.join(labels)}")
    levels = _levels(parser, args.concurrency)
    _bounded(parser, "--duration", args.duration, 0.0, MAX_DURATION_S, open_low=True)
    _bounded(parser, "--max-requests", args.max_requests, 1, MAX_REQUESTS)
    _bounded(parser, "--timeout", args.timeout, 0.0, MAX_TIMEOUT_S, open_low=True)
    _bounded(parser, "--pool-size", args.pool_size, 1, len(PHRASES))
    _bounded(parser, "--repeat-ratio", args.repeat_ratio, 0.0, 1.0)
    if args.seed < 0:
        parser.error("--seed must be 0 or more")
    started = datetime.now(UTC)
    out = args.out or Path("bench-results") / f"bench-{started:%Y%m%d-%H%M%S}"
    plan = SweepPlan(
        targets=tuple(targets),
        concurrency=levels,
        duration_s=args.duration,
        max_requests=args.max_requests,
        timeout_s=args.timeout,
        pool_size=args.pool_size,
        repeat_ratio=args.repeat_ratio,
        seed=args.seed,
        run_id=secrets.token_hex(3),
        prime=args.prime,
        api_key=args.api_key or None,
    )
    return Options(
        plan=plan,
        out=out,
        plot=not args.no_plot,
        check_ready=not args.no_ready_check,
        verbose=args.verbose,
    )


def check_targets_ready(targets: Sequence[Target]) -> list[str]:
    """One problem line per target whose GET /readyz is not 200 (unreachable or not ready)."""
    problems: list[str] = []
    for target in targets:
        url = target.url + target.ready_path
        try:
            status = httpx.get(url, timeout=READY_TIMEOUT_S).status_code
        except httpx.HTTPError as e:
            problems.append(f"target {target.label!r}: {url} is unreachable ({type(e).__name__})")
            continue
        if status != 200:
            problems.append(f"target {target.label!r}: {url} answered {status}, not ready")
    return problems


def _levels(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        parser.error(f"--concurrency {text!r} must be integers separated by commas")
    if not levels:
        parser.error("--concurrency needs at least one level")
    if len(levels) > MAX_LEVELS:
        parser.error(f"--concurrency has {len(levels)} levels; at most {MAX_LEVELS}")
    if len(set(levels)) != len(levels):
        parser.error(f"--concurrency {text!r} repeats a level")
    for level in levels:
        _bounded(parser, "--concurrency", level, 1, MAX_CONCURRENCY)
    return tuple(sorted(levels))


def _bounded(
    parser: argparse.ArgumentParser,
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
) -> None:
    too_low = value <= low if open_low else value < low
    if too_low or value > high or value != value:
        side = "above" if open_low else "at least"
        parser.error(f"{name} {value} is out of range: {side} {low} and at most {high}")
