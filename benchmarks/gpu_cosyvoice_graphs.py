"""Every CUDA graph the cosyvoice engine captures, replayed alone: what each bucket costs.

Loads and warms the engine as the worker does (all graphs captured), then replays each captured
bucket once more on its own, between device synchronisations, with a watchdog: a replay that
does not finish in `--watchdog` seconds dumps every thread's stack and ends the process, so a
graph that hangs the GPU names itself. Prints, per stage, every bucket's milliseconds (with
`--all`) or the slowest few, and the warm-up's time and memory.

    python benchmarks/gpu_cosyvoice_graphs.py --model-dir /tmp/cv_full
    python benchmarks/gpu_cosyvoice_graphs.py --model cosyvoice3 --model-dir /tmp/cv3_full \\
        --engine-option dit_graphs=true
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_cosyvoice import MODELS, engine_option, model_dir_arg
from worker.engines.cosyvoice import create_engine


def graph_stages(engine: Any) -> dict[str, dict[Any, torch.cuda.CUDAGraph]]:
    """Each stage's captured graphs by bucket key (stages without graphs left out)."""
    scheduler = engine._require()[0]
    stages: dict[str, dict[Any, torch.cuda.CUDAGraph]] = {
        "decode step": dict(scheduler.decoder._graphs)}
    audio = scheduler.audio
    flow = audio.flow
    holders = {"flow solver": getattr(flow, "solver_graphs", None),
               "flow encoder": getattr(flow, "encoder_graphs", None),
               "DiT step": getattr(flow, "step_graphs", None),
               "vocoder": getattr(audio, "vocoder_graphs", None)}
    for name, holder in holders.items():
        if holder is not None:
            stages[name] = {key: bucket.graph for key, bucket in holder._buckets.items()
                            if bucket.graph is not None}
    return {name: graphs for name, graphs in stages.items() if graphs}


def replay_ms(graph: torch.cuda.CUDAGraph, watchdog_s: float) -> float:
    torch.cuda.synchronize()
    faulthandler.dump_traceback_later(watchdog_s, exit=True)
    started = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    return 1000 * (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cosyvoice2")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-streams", type=int, default=128)
    parser.add_argument("--watchdog", type=float, default=20.0)
    parser.add_argument("--all", action="store_true", help="print every bucket")
    parser.add_argument("--engine-option", type=engine_option, action="append", default=[])
    parser.set_defaults(device="cuda")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark replays CUDA graphs: it needs a GPU")
    model_dir_arg(parser, args)
    started = time.perf_counter()
    engine = create_engine(model_dir=args.model_dir, device="cuda", dtype=args.dtype,
                           max_streams=args.max_streams, **dict(args.engine_option))
    engine.load()
    loaded = time.perf_counter()
    engine.warm_up()
    print(f"loaded in {loaded - started:.1f} s, warm (graphs captured) in "
          f"{time.perf_counter() - loaded:.1f} s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
          f"allocated, {torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved", flush=True)
    for name, graphs in graph_stages(engine).items():
        times = {key: replay_ms(graph, args.watchdog) for key, graph in graphs.items()}
        shown = times if args.all else dict(sorted(times.items(), key=lambda kv: -kv[1])[:5])
        print(f"{name}: {len(times)} graphs, {sum(times.values()):.0f} ms in all; "
              + ("every" if args.all else "slowest") + ": "
              + ", ".join(f"{key} {ms:.1f} ms" for key, ms in shown.items()), flush=True)
    engine._require()[0].stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
