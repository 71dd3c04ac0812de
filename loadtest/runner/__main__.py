"""`python -m loadtest.runner`: run a sweep, print a table, write JSON and a PNG plot.

Exit status: 0 when the sweep ran, 1 when no request succeeded at all, 2 for bad arguments or
a target that is unreachable or not ready.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from loadtest.runner.cli import build_parser, check_targets_ready, parse_options
from loadtest.runner.report import (
    HEADER,
    cache_line,
    document,
    error_line,
    table_row,
    write_json,
)
from loadtest.runner.stats import LevelResult
from loadtest.runner.sweep import run_sweep


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.INFO if options.verbose else logging.WARNING)
    plan = options.plan
    if options.check_ready:
        problems = check_targets_ready(plan.targets)
        if problems:
            build_parser().exit(2, "\n".join(["error: target check failed:", *problems]) + "\n")
    started_at = datetime.now(UTC)
    runs = len(plan.targets) * len(plan.concurrency)
    print(
        f"run {plan.run_id}: {len(plan.targets)} targets x {len(plan.concurrency)} levels, each "
        f"at most {plan.duration_s:g} s and {plan.max_requests} requests "
        f"(at most {runs * plan.duration_s:g} s of load, plus requests in flight)",
        flush=True,
    )
    print(HEADER, flush=True)

    def show(result: LevelResult) -> None:
        print(table_row(result), flush=True)
        for line in (cache_line(result), error_line(result)):
            if line:
                print(line, flush=True)

    results = asyncio.run(run_sweep(plan, on_level=show))
    json_path = options.out.with_suffix(".json")
    write_json(json_path, document(plan, results, started_at))
    print(f"wrote {json_path}")
    if options.plot:
        from loadtest.runner.plot import write_plot

        png_path = options.out.with_suffix(".png")
        title = " vs ".join(t.label for t in plan.targets) + f" (run {plan.run_id})"
        write_plot(png_path, results, title)
        print(f"wrote {png_path}")
    return 0 if any(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
