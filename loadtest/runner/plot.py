"""The PNG plot: latency and throughput against concurrency, one line per target."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from loadtest.runner.stats import LevelResult


def write_plot(path: Path, results: Sequence[LevelResult], title: str) -> None:
    """Six panels: time to first audio, total latency (p50 solid, p95 dashed), requests/s,
    audio-seconds/s, each stream's worst gap behind playback (p50 solid, p99 dashed) and the
    share of streams without an underrun, each against concurrency on a log-2 axis."""
    labels = list(dict.fromkeys(r.target for r in results))
    levels = sorted({r.concurrency for r in results})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    panels = (
        (axes[0][0], "time to first audio (s)", "p95", lambda r: (r.ttfa_s.p50, r.ttfa_s.p95)),
        (axes[0][1], "total latency (s)", "p95", lambda r: (r.latency_s.p50, r.latency_s.p95)),
        (
            axes[0][2],
            "worst gap behind playback (s)",
            "p99",
            lambda r: (r.worst_gap_s.p50, r.worst_gap_s.p99),
        ),
        (axes[1][0], "requests/s", "", lambda r: (r.requests_per_s, None)),
        (axes[1][1], "audio-seconds/s", "", lambda r: (r.audio_seconds_per_s, None)),
        (
            axes[1][2],
            "streams without underrun (%)",
            "",
            lambda r: (_percent(r.without_underrun_ratio), None),
        ),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ylabel, tail_name, pick in panels:
        for index, label in enumerate(labels):
            rows = sorted((r for r in results if r.target == label), key=lambda r: r.concurrency)
            xs = [r.concurrency for r in rows]
            main = [pick(r)[0] for r in rows]
            tail = [pick(r)[1] for r in rows]
            color = colors[index % len(colors)]
            has_tail = any(v is not None for v in tail)
            name = f"{label} p50" if has_tail else label
            ax.plot(xs, _nan(main), marker="o", color=color, label=name)
            if has_tail:
                ax.plot(
                    xs,
                    _nan(tail),
                    marker="x",
                    linestyle="--",
                    color=color,
                    label=f"{label} {tail_name}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, labels=[str(level) for level in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _percent(ratio: float | None) -> float | None:
    return None if ratio is None else 100 * ratio


def _nan(values: Sequence[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]
