"""The LLM's batched decode step alone: its time and kernel count by batch size.

Loads the engine (a full-size random-weight CosyVoice2 directory is built if `--model-dir` has
none), captures the decode graphs as warm-up does, fills `--rows` rows of the slot pool with a
prompt of `--prompt` positions each, and times `--steps` steps per batch size: the graph replay
alone (CUDA events, median), the whole `BatchDecoder.step` as the scheduler calls it (inputs up,
replay, tokens down: wall time, median), and the kernels one eager step launches (profiler).
`--compile` puts the step through `torch.compile` (dynamic batch) before the graphs are
captured, and prints how long that took.

    python benchmarks/gpu_cosyvoice_decode.py --model-dir /tmp/cv_full --rows 1,16,64,128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_cosyvoice import levels_arg
from testbed.cosyvoice_models import build_model_dir
from worker.engines.cosyvoice.batch_decode import BatchDecoder, Row, buckets
from worker.engines.cosyvoice.engine import CosyVoiceEngine


def kernels_launched(run: Callable[[], Any], device: torch.device) -> int:
    """Device kernels (CUDA) or top-level operators (CPU) that one eager `run()` launches."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)


def kernels_per_step(decoder: BatchDecoder, rows: list[Row], device: torch.device) -> int:
    """Kernels (CPU: operators) of one eager step over `rows`."""
    size = next(b for b in buckets(decoder.slots) if b > max(r.slot for r in rows))
    return kernels_launched(lambda: decoder._compute(size), device)


def time_steps(decoder: BatchDecoder, rows: list[Row], steps: int, device: torch.device
               ) -> tuple[float, float]:
    """Median milliseconds of a graph replay (nan without graphs) and of a whole `step`."""
    size = next(b for b in buckets(decoder.slots) if b > max(r.slot for r in rows))
    replay_ms = float("nan")
    graph = decoder._graphs.get(size)
    if graph is not None:
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        replay_ms = statistics.median(times)
    walls = []
    for _ in range(steps):
        started = time.perf_counter()
        tokens = decoder.step(rows)
        walls.append(1000 * (time.perf_counter() - started))
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
    return replay_ms, statistics.median(walls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rows", type=levels_arg, default=levels_arg("1,16,64,128"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt", type=int, default=150, help="prompt positions per row")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run on a tiny model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not (args.model_dir / "llm.pt").exists():
        build_model_dir(args.model_dir, size="full")
    device = torch.device(args.device)
    engine = CosyVoiceEngine(args.model_dir, device=args.device, dtype=args.dtype,
                             max_streams=max(args.rows))
    engine.load()
    decoder = engine._require()[0].decoder
    started = time.perf_counter()
    if args.compile:
        compiled = torch.compile(decoder._compute, dynamic=True)
        decoder._compute = compiled  # type: ignore[method-assign]
        for size in (1, 2):
            decoder._compute(size)
        print(f"compiled in {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
    decoder.capture()
    print(f"decode graphs captured in {time.perf_counter() - started:.1f} s "
          f"({len(decoder._graphs)} buckets)", flush=True)
    hidden = decoder.lm.llm_decoder.in_features
    dtype = decoder.lm.llm_decoder.weight.dtype
    gen = torch.Generator().manual_seed(0)
    for n in args.rows:
        rows = [Row(slot=i, seed=i, min_len=0, max_len=args.steps * 2 + 4) for i in range(n)]
        prompts = [torch.randn(1, args.prompt, hidden, generator=gen).to(device, dtype)
                   for _ in rows]
        for row, token in zip(rows, decoder.prefill_rows(rows, prompts), strict=True):
            row.tokens.append(token)
        kernels = kernels_per_step(decoder, rows, device)
        replay_ms, step_ms = time_steps(decoder, rows, args.steps, device)
        print(f"rows {n:>4}: graph replay {replay_ms:7.3f} ms  step {step_ms:7.3f} ms  "
              f"kernels per step {kernels}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
