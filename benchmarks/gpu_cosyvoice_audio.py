"""Profile of the cosyvoice audio stage alone: where a streamed chunk's time goes, by batch size.

Streams `--rows` utterances (registered 3 s voice, `--tokens` speech tokens each, already decoded)
through the audio stage's `run` chunk by chunk, all in one batch, with nothing else on the GPU.
For each batch size it prints the wall time per call split into its parts (CosyVoice2: encoder,
flow solver, vocoder; CosyVoice3: flow, vocoder) and the rest (each part timed between device
synchronisations), audio-seconds per wall-second, and, from
the PyTorch profiler over one later chunk, the GPU's busy time against the wall time and the
kernels that take most of it. The arithmetic of one utterance's chunks, counted once eagerly
(`torch.utils.flop_counter`: matrix products, convolutions and attention), turns each part's
time into achieved TFLOP/s and a share of the device's bf16 dense peak (`--peak-tflops`).

    python benchmarks/gpu_cosyvoice_audio.py --model-dir /tmp/cv_full --rows 1,16,64
    python benchmarks/gpu_cosyvoice_audio.py --model cosyvoice3 --model-dir /tmp/cv3_full --graphs
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_cosyvoice import (
    MODELS,
    PROMPT_TEXT,
    decoded_utterances,
    engine_option,
    levels_arg,
    model_dir_arg,
    prompt_audio,
    speak_decoded,
)
from worker.engines.cosyvoice import create_engine, v3_hift_stream
from worker.engines.cosyvoice.v3_pipeline import V3AudioStage


class PartTimer:
    """Wall time of named methods, each bracketed by device synchronisations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


Part = tuple[str, Any, str]
"""(name, owner, attribute): a method or module function timed and counted as one part."""


def parts_of(audio: Any) -> list[Part]:
    """The parts of an audio stage's call: CosyVoice2's `AudioStage` (encoder, solver, vocoder)
    or CosyVoice3's `V3AudioStage` (flow, vocoder)."""
    if isinstance(audio, V3AudioStage):
        return [("flow", audio.flow, "advance"), ("vocoder", v3_hift_stream, "advance")]
    return [("encoder", audio.flow, "_encode"), ("solver", audio.flow, "_solve_incremental"),
            ("vocoder", audio, "_vocode")]


GRAPH_ATTRIBUTES = (("flow", "solver_graphs"), ("flow", "encoder_graphs"),
                    ("audio", "vocoder_graphs"), ("flow", "step_graphs"))
"""Where each model's audio stage keeps its graphs (those a model lacks are skipped)."""


def utterance_flops(audio: Any, utt: Any) -> dict[str, int]:
    """FLOPs of each part over all of one utterance's chunks, every stage eager (no graphs
    capture what the counter sees); a batch of R rows does R times this."""
    owners = {"flow": audio.flow, "audio": audio}
    graphs = {(o, a): getattr(owners[o], a) for o, a in GRAPH_ATTRIBUTES
              if hasattr(owners[o], a)}
    for (o, a) in graphs:
        setattr(owners[o], a, None)
    counted: dict[str, int] = defaultdict(int)
    parts = parts_of(audio)
    originals = {name: getattr(owner, attr) for name, owner, attr in parts}

    def counting(name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with FlopCounterMode(display=False) as counter:
                result = originals[name](*args, **kwargs)
            counted[name] += counter.get_total_flops()
            return result
        return run

    for name, owner, attr in parts:
        setattr(owner, attr, counting(name))
    try:
        speak_decoded(audio, [utt])
    finally:
        for name, owner, attr in parts:
            setattr(owner, attr, originals[name])
        for (o, a), kept in graphs.items():
            setattr(owners[o], a, kept)
    return dict(counted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cosyvoice2",
                        help="the model --model-dir holds (or gets, built at full size)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rows", type=levels_arg, default=levels_arg("1,16,64"))
    parser.add_argument("--tokens", type=int, default=240)
    parser.add_argument("--graphs", action="store_true",
                        help="capture every graph first, as the engine's warm-up does")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the flow's estimator before the graphs are captured")
    parser.add_argument("--profile-call", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cpu for a dry run on a tiny model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--engine-option", type=engine_option, action="append", default=[],
                        help="name=value (JSON value), passed to the engine")
    args = parser.parse_args()
    model_dir_arg(parser, args)
    engine = create_engine(model_dir=args.model_dir, device=args.device, dtype=args.dtype,
                           cuda_graph=args.graphs, max_streams=max(args.rows),
                           **dict(args.engine_option))
    engine.load()
    t = time.perf_counter()
    if args.compile:
        torch._dynamo.config.cache_size_limit = 64
        estimator = engine._require()[0].audio.flow.decoder.estimator
        estimator.forward = torch.compile(  # type: ignore[method-assign]
            estimator.forward, dynamic=True)
    engine.warm_up()
    reserved = torch.cuda.memory_reserved() / 2**30 if args.device == "cuda" else 0.0
    print(f"warm-up {time.perf_counter() - t:.1f} s; {reserved:.1f} GiB reserved", flush=True)
    scheduler, _ = engine._require()
    audio = scheduler.audio
    engine.add_voice("bench", engine.compute_voice(prompt_audio(), 16000, PROMPT_TEXT))
    device = torch.device(args.device)
    timer = PartTimer(device)
    parts = parts_of(audio)
    for name, owner, attr in parts:
        timer.wrap(owner, attr, name)
    timer.wrap(audio, "run", "call")
    speak_decoded(audio, decoded_utterances(engine, [0], 60))  # warm the allocator
    flops = utterance_flops(audio, decoded_utterances(engine, [0], args.tokens)[0])
    print("GFLOP per utterance: " + ", ".join(f"{name} {value / 1e9:.1f}"
                                               for name, value in flops.items()), flush=True)
    for rows in args.rows:
        timer.seconds.clear()
        utts = decoded_utterances(engine, list(range(rows)), args.tokens)
        profiled: dict[str, Any] = {}

        def on_call(index: int, profiled: dict[str, Any] = profiled) -> Any:
            if index != args.profile_call:
                return contextlib.nullcontext()
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            profiled["prof"] = prof
            return prof

        start = time.perf_counter()
        calls, _ = speak_decoded(audio, utts, on_call)
        wall = time.perf_counter() - start
        s = timer.seconds
        rest = s["call"] - sum(s[name] for name, _, _ in parts)
        audio_s = rows * args.tokens / 25
        split = ", ".join(f"{name} {1000 * value / calls:6.1f}" for name, value in (
            *((name, s[name]) for name, _, _ in parts), ("rest", rest)))
        print(f"rows {rows:4d}: {calls} calls, {1000 * s['call'] / calls:7.1f} ms per call "
              f"({split}); {audio_s / wall:7.1f} audio-s/s", flush=True)
        achieved = {name: rows * flops[name] / s[name] / 1e12 for name in flops if s[name] > 0}
        print("  achieved: " + ", ".join(
            f"{name} {tflops:.1f} TFLOP/s ({100 * tflops / args.peak_tflops:.1f}% of peak)"
            for name, tflops in achieved.items()), flush=True)
        prof = profiled.get("prof")
        if prof is not None:
            events = prof.key_averages()
            busy = sum(e.self_device_time_total for e in events) / 1000
            kernels = sum(e.count for e in events if e.self_device_time_total > 0)
            print(f"  profiled call {args.profile_call}: GPU busy {busy:.1f} ms over "
                  f"{kernels} device ops", flush=True)
            print(events.table(sort_by="self_device_time_total", row_limit=25), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
