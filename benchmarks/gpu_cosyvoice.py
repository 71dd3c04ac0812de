"""GPU benchmark: the cosyvoice engine under concurrent streams, beside the upstream implementation.

`--model cosyvoice2` (the default) or `cosyvoice3` names the model `--model-dir` holds; a
directory without flow.pt gets (once) a full-size random-weight one of that model (Qwen2-0.5B
shape; CosyVoice2's released flow and HiFT, or Fun-CosyVoice3-0.5B's 22-layer DiT and causal
HiFT). With `--device cpu` (a dry run) nothing is built: the directory must hold a model, e.g. a
tiny one from `testbed.cosyvoice_models` or `testbed.cosyvoice3_models`. Every request is
zero-shot with a registered 3 s voice and decodes a fixed number of speech tokens, end of speech
ignored (random weights never end CosyVoice2's speech; 240 tokens = 9.6 s of audio). For each
concurrency level, that many streams start at once, in-process through `engine.stream` and/or
through a real `python -m worker` over HTTP; it prints time to first audio p50/p99, aggregate
audio-seconds per second, per-stream real-time factor, the worst wait past what the listener had
left to play (underrun), and peak GPU memory. The upstream implementation (`cosyvoice2-eu`) runs
the same request at the levels given to `--upstream`. Each mode first sends one unmeasured
request, so the first level does not pay the first zero-shot request's one-time costs.

    python benchmarks/gpu_cosyvoice.py --model-dir /tmp/cv_full --concurrency 1,4,16,64,128 \
        --modes inproc,http --upstream 1,4 --out results.json
    python benchmarks/gpu_cosyvoice.py --model cosyvoice3 --model-dir /tmp/cv3_full \
        --concurrency 1,4,16 --modes inproc,http --out results_cv3.json

`--upstream` is CosyVoice2's only (no package ships upstream's CosyVoice3) and is refused with
`--model cosyvoice3`.

`--engine-option NAME=JSON` passes an engine option to both modes (`first_chunk_tokens=10`,
`flow_steps=5`; CosyVoice3 takes `flow_steps` 10 only) to measure it beside the defaults.
`--live-option NAME=V1,V2` runs every in-process level once per value of an option a warm engine
takes between levels (`later_chunk_hops=1,2`, read when a request is planned, or
`first_chunk_gather_steps=0,4`, read by the scheduler's audio loop), one after the other in the
same engine, and prints each value's throughput and first-audio p99 against the first's.
Repeated, it sweeps several options in the one warm-up, each with the others at their defaults:

    python benchmarks/gpu_cosyvoice.py --model-dir /tmp/cv_full --concurrency 1,16,64,128 \
        --live-option later_chunk_hops=1,2 --live-option first_chunk_gather_steps=0,4

`--check` also verifies that requests batched together get the same speech as each alone (within
the engine's stated tolerance) and exits 1 if they do not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.playback import UNDERRUN_THRESHOLD_S, PlaybackClock
from testbed import cosyvoice3_models, cosyvoice_models
from testbed.processes import free_port, python_service
from worker.engines.base import EngineRequest
from worker.engines.cosyvoice import SpeechEngine, create_engine

SR = 24000
TEXT = "Hello world, this is a test of streaming speech."
PROMPT_TEXT = "Hello world, this is a prompt."
BATCH_AUDIO_TOLERANCE = 1e-2
MODELS = {"cosyvoice2": ("cosyvoice2.yaml", cosyvoice_models.build_model_dir),
          "cosyvoice3": ("cosyvoice3.yaml", cosyvoice3_models.build_model_dir)}
"""For each `--model`: the yaml its directory holds, and the builder of a random-weight one."""


def prompt_audio(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return wav.astype(np.float32)


class StreamStats:
    """What one client saw: first audio, chunk arrivals against playback, total audio."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.clock = PlaybackClock()
        self.error: str | None = None
        self.ended = started

    def chunk(self, samples: int) -> None:
        now = time.perf_counter()
        if self.first is None and samples:
            self.first = now - self.started
        self.clock.chunk(now, samples / SR)
        self.ended = now


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(name: str, concurrency: int, stats: list[StreamStats], wall: float,
              peak_gib: float) -> dict[str, Any]:
    ok = [s for s in stats if s.error is None and s.first is not None]
    audio = sum(s.clock.audio_s for s in ok)
    row = {
        "name": name, "concurrency": concurrency, "ok": len(ok), "failed": len(stats) - len(ok),
        "ttfa_p50_ms": 1000 * percentile([s.first for s in ok if s.first is not None], 50),
        "ttfa_p99_ms": 1000 * percentile([s.first for s in ok if s.first is not None], 99),
        "audio_s_per_s": audio / wall,
        "rtf_p50": percentile([(s.ended - s.started) / s.clock.audio_s for s in ok], 50),
        "rtf_max": max(((s.ended - s.started) / s.clock.audio_s for s in ok), default=float("nan")),
        "worst_gap_p50_ms": 1000 * percentile([s.clock.worst_gap_s for s in ok], 50),
        "worst_gap_max_ms": 1000 * max((s.clock.worst_gap_s for s in ok), default=float("nan")),
        "no_underrun_share": (sum(not s.clock.underrun for s in ok) / len(ok)) if ok else 0.0,
        "peak_gpu_gib": peak_gib,
        "errors": sorted({s.error for s in stats if s.error})[:3],
    }
    print(f"{name:<10} c={concurrency:<4} ok {row['ok']:>4} fail {row['failed']:>3}  "
          f"ttfa p50 {row['ttfa_p50_ms']:7.0f} p99 {row['ttfa_p99_ms']:7.0f} ms  "
          f"{row['audio_s_per_s']:7.1f} audio-s/s  rtf p50 {row['rtf_p50']:.3f} "
          f"max {row['rtf_max']:.3f}  worst gap p50 {row['worst_gap_p50_ms']:6.0f} "
          f"max {row['worst_gap_max_ms']:6.0f} ms  "
          f"no-underrun {100 * row['no_underrun_share']:5.1f}%  peak {peak_gib:5.1f} GiB",
          flush=True)
    return row


def peak_memory_gib(reset: bool = False) -> float:
    if not torch.cuda.is_available():
        return 0.0
    value = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return value


# -- in-process ---------------------------------------------------------------------------------

LEVEL_TIMEOUT_S = 120.0
"""A stream not done this long after its level started counts as failed (and is cancelled)."""


async def stream_inproc(engine: SpeechEngine, request: EngineRequest) -> StreamStats:
    stats = StreamStats(time.perf_counter())
    try:
        async with asyncio.timeout(LEVEL_TIMEOUT_S):
            async for chunk in engine.stream(request):
                stats.chunk(chunk.size)
    except TimeoutError:
        stats.error = f"not done after {LEVEL_TIMEOUT_S:.0f} s"
    except Exception as e:
        stats.error = repr(e)[:200]
    return stats


class StageTimer:
    """Wall time and calls of the scheduler's batched stages (decode step, prefill, audio) and
    of its per-request prompt embedding; with `timeline`, each level's report also says when
    its requests reached the scheduler and lists its first calls of each batched stage."""

    def __init__(self, engine: SpeechEngine, timeline: int = 0) -> None:
        scheduler = engine._require()[0]
        self.totals: dict[str, list[float]] = {}
        self.timeline = timeline
        self.events: list[tuple[str, float, float, int, int]] = []
        self.level_started = time.perf_counter()
        self._wrap(scheduler.decoder, "step", lambda a: len(a[0]), lambda a: 0)
        self._wrap(scheduler.decoder, "prefill_rows", lambda a: len(a[0]), lambda a: 0)
        self._wrap(scheduler.audio, "run", lambda a: len(a[0]),
                   lambda a: sum(1 for chunk in a[0] if chunk.utterance.offset == 0))
        self._wrap(scheduler, "embed", lambda a: 1, lambda a: 0)
        self._wrap(scheduler, "submit", lambda a: 1, lambda a: 0)

    def _wrap(self, owner: Any, name: str, rows: Any, first_rows: Any) -> None:
        original = getattr(owner, name)

        def timed(*args: Any) -> Any:
            count, first = rows(args), first_rows(args)  # before the call moves offsets on
            started = time.perf_counter()
            try:
                return original(*args)
            finally:
                ended = time.perf_counter()
                entry = self.totals.setdefault(name, [0.0, 0.0, 0.0])
                entry[0] += ended - started
                entry[1] += 1
                entry[2] += count
                if self.timeline:
                    self.events.append((name, started - self.level_started, ended - started,
                                        count, first))

        setattr(owner, name, timed)

    def start_level(self) -> None:
        self.level_started = time.perf_counter()
        self.events.clear()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: {"calls": int(n), "mean_ms": 1000 * t / max(n, 1), "mean_rows": r / max(n, 1),
                   "total_s": t}
            for name, (t, n, r) in self.totals.items()}
        print("  stages: " + "; ".join(
            f"{k} {v['calls']} calls x {v['mean_ms']:.1f} ms ({v['mean_rows']:.1f} rows)"
            for k, v in out.items()), flush=True)
        if self.timeline:
            out["timeline"] = self._first_calls()
        self.totals.clear()
        return out

    def _first_calls(self) -> list[dict[str, Any]]:
        """The level's first `timeline` prefill and audio calls, with the decode steps run
        before each (start and duration in ms from the level's start), after when the first
        and the last request reached the scheduler."""
        arrivals = sorted(1000 * start for name, start, *_ in self.events if name == "submit")
        if arrivals:
            print(f"    {len(arrivals)} requests reached the scheduler from {arrivals[0]:.1f} "
                  f"to {arrivals[-1]:.1f} ms", flush=True)
        shown: list[dict[str, Any]] = []
        steps = 0
        step_ms = 0.0
        for name, start, duration, rows, first_rows in sorted(self.events,
                                                              key=lambda e: e[1]):
            if name in ("submit", "embed"):
                continue
            if name == "step":
                steps += 1
                step_ms += 1000 * duration
                continue
            if sum(1 for e in shown if e["stage"] == name) >= self.timeline:
                continue
            shown.append({"stage": name, "start_ms": round(1000 * start, 1),
                          "ms": round(1000 * duration, 1), "rows": rows,
                          "first_chunks": first_rows, "steps_before": steps,
                          "step_ms_before": round(step_ms, 1)})
        for e in shown:
            print(f"    {e['stage']:7s} at {e['start_ms']:7.1f} ms for {e['ms']:6.1f} ms, "
                  f"{e['rows']} rows ({e['first_chunks']} first chunks); "
                  f"{e['steps_before']} steps before ({e['step_ms_before']:.0f} ms)", flush=True)
        return shown


async def sweep_inproc(engine: SpeechEngine, levels: list[int], rows: list[dict[str, Any]],
                       timeline: int = 0,
                       variants: list[tuple[str, dict[str, Any]]] | None = None) -> None:
    """Each level once per variant (a name, and `LIVE_OPTIONS` set on the warm engine before
    it), the variants one after another at each level; a row for each appended to `rows`."""
    warm = EngineRequest(text=TEXT, voice="bench", speed=1.0, seed=0)
    await stream_inproc(engine, warm)  # unmeasured, as through HTTP
    timer = StageTimer(engine, timeline)
    for c in levels:
        for name, settings in variants or [("inproc", {})]:
            for option, value in settings.items():
                LIVE_OPTIONS[option](engine, value)
            peak_memory_gib(reset=True)
            timer.start_level()
            requests = [EngineRequest(text=TEXT, voice="bench", speed=1.0, seed=i)
                        for i in range(c)]
            started = time.perf_counter()
            stats = await asyncio.gather(*(stream_inproc(engine, r) for r in requests))
            row = summarize(name, c, list(stats), time.perf_counter() - started,
                            peak_memory_gib())
            row["stages"] = timer.report()
            rows.append(row)


def _set_gather_steps(engine: SpeechEngine, steps: int) -> None:
    engine.first_chunk_gather_steps = steps
    engine._require()[0].gather_steps = steps


def _set_decode_priority(engine: SpeechEngine, high: bool) -> None:
    engine.decode_priority = high
    engine._require()[0].decode_priority = high


LIVE_OPTIONS: dict[str, Callable[[SpeechEngine, Any], None]] = {
    "later_chunk_hops": lambda engine, v: setattr(engine, "later_chunk_hops", v),
    "first_chunk_tokens": lambda engine, v: setattr(engine, "first_chunk_tokens", v),
    "first_chunk_gather_steps": _set_gather_steps,
    "decode_priority": _set_decode_priority,
}
"""Engine options a warm engine takes between levels (read when a request is planned, or by
the scheduler's loops), and how to set each."""


def live_variants(parser: argparse.ArgumentParser, args: argparse.Namespace
                  ) -> list[tuple[str, dict[str, Any]]] | None:
    """Each `--live-option NAME=V1,V2,...` as variants of the in-process sweep, each value
    checked by the engine's own validation. A variant sets every option named to its default
    but its own, so one option's values run side by side with the others as configured."""
    if not args.live_option:
        return None
    parsed: dict[str, list[Any]] = {}
    for option in args.live_option:
        name, _, text = option.partition("=")
        if name not in LIVE_OPTIONS:
            parser.error(f"--live-option takes one of {', '.join(LIVE_OPTIONS)}, not {name!r}")
        if name in parsed:
            parser.error(f"--live-option {name} is given twice")
        parsed[name] = [json.loads(v) for v in text.split(",") if v]
        if len(parsed[name]) < 2:
            parser.error("--live-option needs two values or more to compare, e.g. "
                         "later_chunk_hops=1,2")
    defaults = create_engine(model_dir=args.model_dir, **args.engine_option)
    baseline = {name: getattr(defaults, name) for name in parsed}
    built_hops = defaults.later_chunk_hops
    if max(parsed.get("later_chunk_hops", [0])) > built_hops:
        parser.error(f"the engine's graphs hold later chunks of up to {built_hops} hops (its "
                     "later_chunk_hops); to sweep more, pass --engine-option "
                     "later_chunk_hops=N with N the most swept")
    variants = []
    for name, values in parsed.items():
        for value in values:
            try:
                create_engine(model_dir=args.model_dir, **{**args.engine_option, name: value})
            except ValueError as e:
                parser.error(str(e))
            variants.append((f"{name}={json.dumps(value)}", {**baseline, name: value}))
    return variants


def print_ratios(rows: list[dict[str, Any]], variants: list[tuple[str, dict[str, Any]]]) -> None:
    """Each option's variants against its first value at every level: throughput and
    first-audio p99."""
    by_key = {(r["name"], r["concurrency"]): r for r in rows}
    bases: dict[str, str] = {}
    for name, _ in variants:
        option = name.partition("=")[0]
        base = bases.setdefault(option, name)
        if base == name:
            continue
        for (n, c), row in by_key.items():
            first = by_key.get((base, c))
            if n != name or first is None:
                continue
            print(f"{name} / {base}  c={c:<4} audio-s/s x"
                  f"{row['audio_s_per_s'] / max(first['audio_s_per_s'], 1e-9):.2f}  "
                  f"ttfa p99 x{row['ttfa_p99_ms'] / max(first['ttfa_p99_ms'], 1e-9):.2f}")


class SavedRows(list[dict[str, Any]]):
    """The report's rows, the whole report written to `out` (if given) after each one, so a run
    stopped at its time limit keeps every level it finished."""

    def __init__(self, report: dict[str, Any], out: Path | None) -> None:
        super().__init__()
        self.report = report
        self.out = out
        self._save()

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        self._save()

    def _save(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps({**self.report, "results": list(self)}, indent=2))


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")


def decoded_utterances(engine: SpeechEngine, seeds: list[int], tokens: int) -> list[Any]:
    """A request's utterance per seed, already decoded into `tokens` random speech tokens
    drawn from that seed: what the audio stages take, with the LLM out of it."""
    made = []
    for seed in seeds:
        (utt,) = engine.plan(EngineRequest(text=TEXT, voice="bench", speed=1.0, seed=seed))
        ids = torch.randint(0, 6561, (tokens,), generator=torch.Generator().manual_seed(seed))
        utt.tokens = ids.tolist()
        if hasattr(utt, "flow_tokens"):  # CosyVoice3 reads what its silent-token filter passed
            utt.flow_tokens = ids.tolist()
            utt.filtered = tokens
        utt.decoded = True
        made.append(utt)
    return made


def speak_decoded(
    audio: Any, utts: list[Any],
    on_call: Callable[[int], AbstractContextManager[Any]] = lambda _: contextlib.nullcontext(),
) -> tuple[int, list[np.ndarray]]:
    """Stream decoded utterances through the audio stage chunk by chunk, all in one batch while
    they last, each call inside `on_call(its index)`; the calls made and each one's audio."""
    spoken: list[list[np.ndarray]] = [[] for _ in utts]
    calls = 0
    while ready := [(i, c) for i, u in enumerate(utts) if (c := audio.next_chunk(u)) is not None]:
        with on_call(calls):
            results = audio.run([chunk for _, chunk in ready])
        for (i, _), result in zip(ready, results, strict=True):
            if isinstance(result, Exception):
                raise result
            spoken[i].append(result)
        calls += 1
    return calls, [np.concatenate(parts) for parts in spoken]


def check_audio_stages(engine: SpeechEngine, tokens: int) -> bool:
    """The audio stages alone on fixed speech tokens: a request's audio alone twice, and
    batched with 7 others, within the stated tolerance. With the LLM out of it, a difference
    is the flow and vocoder's arithmetic."""
    audio = engine._require()[0].audio

    def speak(seeds: list[int]) -> list[np.ndarray]:
        return speak_decoded(audio, decoded_utterances(engine, seeds, tokens))[1]

    solo = [speak([seed])[0] for seed in (1, 2, 3)]
    again = speak([1])[0]
    together = speak([1, 2, 3, 4, 5, 6, 7, 8])
    alone = max_difference(again, solo[0])
    batched = [max_difference(t, s) for t, s in zip(together, solo, strict=False)]
    ok = max([alone, *batched]) <= BATCH_AUDIO_TOLERANCE
    print(f"check, audio stages on fixed tokens: alone twice max abs diff {alone:.2e}; batched "
          f"vs alone {[f'{d:.2e}' for d in batched]} (tolerance {BATCH_AUDIO_TOLERANCE}) "
          f"-> {'ok' if ok else 'FAILED'}", flush=True)
    return ok


def check_batched(engine: SpeechEngine) -> bool:
    """Requests batched together give each its solo audio within the stated tolerance where
    they drew the same speech tokens. Each request's utterances are kept (`stream_planned`),
    so a difference is told apart: different speech tokens (the LLM's draws: not comparable,
    reported), or the same tokens and different audio (the flow and vocoder's arithmetic)."""

    async def collect(seed: int) -> tuple[np.ndarray, list[int]]:
        utterances = engine.plan(EngineRequest(text=TEXT, voice="bench", speed=1.0, seed=seed))
        chunks = [c async for c in engine.stream_planned(utterances, None)]
        return np.concatenate(chunks), [t for u in utterances for t in u.tokens]

    async def run() -> bool:
        solo = [await collect(seed) for seed in (1, 2, 3)]
        again = await collect(1)
        together = await asyncio.gather(*(collect(s) for s in (1, 2, 3, 4, 5, 6, 7, 8)))

        alone = max_difference(again[0], solo[0][0])
        batched = [max_difference(t[0], s[0]) for t, s in zip(together, solo, strict=False)]
        same_tokens = [again[1] == solo[0][1]] + [
            t[1] == s[1] for t, s in zip(together, solo, strict=False)]
        comparable = [d for d, same in zip([alone, *batched], same_tokens, strict=True) if same]
        ok = max(comparable, default=0.0) <= BATCH_AUDIO_TOLERANCE
        peak = max(float(np.abs(a).max()) for a, _ in solo)
        print(f"check: peak |sample| {peak:.3f}; "
              f"alone twice max abs diff {alone:.2e} (identical: {alone == 0}); batched "
              f"vs alone {[f'{d:.2e}' for d in batched]} (tolerance {BATCH_AUDIO_TOLERANCE}); "
              f"same speech tokens: again {same_tokens[0]}, batched {same_tokens[1:]} "
              f"-> {'ok' if ok else 'FAILED'} ({len(comparable)} of 4 comparable)", flush=True)
        return ok

    return asyncio.run(run())


# -- through the worker over HTTP ---------------------------------------------------------------

async def stream_http(client: Any, url: str, body: dict[str, Any]) -> StreamStats:
    stats = StreamStats(time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                stats.error = f"HTTP {response.status_code} {(await response.aread())[:120]!r}"
                return stats
            pending = b""
            async for part in response.aiter_bytes():
                pending += part
                whole = len(pending) // 4 * 4
                stats.chunk(whole // 4)
                pending = pending[whole:]
    except Exception as e:
        stats.error = repr(e)[:200]
    return stats


def sweep_http(model_dir: Path, features: bytes, levels: list[int], tokens: int,
               dtype: str, device: str, log_dir: Path,
               options: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import httpx

    port = free_port()
    env = {
        "WORKER_PORT": str(port), "WORKER_HOST": "127.0.0.1", "WORKER_ENGINE": "cosyvoice",
        "WORKER_MODEL_DIR": str(model_dir), "WORKER_DEVICE": device,
        "WORKER_MAX_CONCURRENCY": str(max(levels)), "WORKER_MAX_QUEUE": "0",
        "WORKER_ENGINE_OPTIONS": json.dumps({
            "dtype": dtype, "fixed_speech_tokens": tokens,
            **({} if device == "cuda" else {"max_streams": max(max(levels), 8)}), **options}),
    }
    with python_service("worker", env, port=port, log_dir=log_dir, timeout=600) as worker:
        base = worker.url

        async def level(c: int, name: str = "http") -> dict[str, Any]:
            limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
            async with httpx.AsyncClient(timeout=LEVEL_TIMEOUT_S, limits=limits) as client:
                bodies = [{"text": TEXT, "voice": "bench", "seed": i, "format": "pcm_f32le",
                           "voice_features": base64.b64encode(features).decode()}
                          for i in range(c)]
                started = time.perf_counter()
                stats = await asyncio.gather(
                    *(stream_http(client, f"{base}/v1/synthesize", b) for b in bodies))
                wall = time.perf_counter() - started
                metrics = (await client.get(f"{base}/metrics")).text
                held = sum(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith("worker_gpu_memory_bytes{"))
                # Through HTTP the figure is the memory the worker holds after the level.
                return summarize(name, c, list(stats), wall, held / 2**30)

        asyncio.run(level(1, "warm-up"))  # unmeasured: the first zero-shot request's one-time costs
        for c in levels:
            rows.append(asyncio.run(level(c)))


# -- upstream ------------------------------------------------------------------------------------

def sweep_upstream(model_dir: Path, levels: list[int], voice: Any, text_ids: list[int],
                   prompt_ids: list[int], tokens: int, rows: list[dict[str, Any]]) -> None:
    from testbed import cosyvoice_upstream

    configs = cosyvoice_upstream.load_configs(model_dir)
    from cosyvoice.cli.model import CosyVoice2Model

    model = CosyVoice2Model(configs["llm"], configs["flow"], configs["hift"], fp16=True)
    model.load(str(model_dir / "llm.pt"), str(model_dir / "flow.pt"), str(model_dir / "hift.pt"))
    inputs = {
        "text": torch.tensor([text_ids], dtype=torch.int32),
        "prompt_text": torch.tensor([prompt_ids], dtype=torch.int32),
        "llm_prompt_speech_token": voice.speech_tokens,
        "flow_prompt_speech_token": voice.speech_tokens,
        "prompt_speech_feat": voice.mel,
        "llm_embedding": voice.embedding,
        "flow_embedding": voice.embedding,
    }
    # Random weights never stop: upstream's own cap (20 per text token) sets the length.
    print(f"upstream decodes {20 * len(text_ids)} tokens per request (ours {tokens})")

    def one(stats: StreamStats) -> None:
        try:
            for out in model.tts(**inputs, stream=True):
                stats.chunk(out["tts_speech"].shape[1])
        except Exception as e:
            stats.error = repr(e)[:200]

    for c in levels:
        peak_memory_gib(reset=True)
        started = time.perf_counter()
        stats = [StreamStats(started) for _ in range(c)]
        threads = [threading.Thread(target=one, args=(s,)) for s in stats]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows.append(summarize("upstream", c, stats, time.perf_counter() - started,
                              peak_memory_gib()))


def engine_option(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    return name, json.loads(value)


def levels_arg(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def model_dir_arg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Build a full-size directory where `--model-dir` holds no model (never on the CPU), and
    refuse one that holds the other model."""
    yaml_name, build = MODELS[args.model]
    others = [n for m, (n, _) in MODELS.items() if m != args.model
              and (args.model_dir / n).is_file()]
    if others:
        parser.error(f"{args.model_dir} holds {others[0]}, not a {args.model} directory")
    if not (args.model_dir / "flow.pt").exists():
        if args.device == "cpu":
            parser.error(f"{args.model_dir} holds no model (no flow.pt); for a dry run on the "
                         "CPU build a tiny one first (testbed's build_model_dir), full size "
                         "is built on the GPU only")
        t = time.perf_counter()
        build(args.model_dir, size="full")
        print(f"built full-size model dir in {time.perf_counter() - t:.0f} s", flush=True)
    if not (args.model_dir / yaml_name).is_file():
        parser.error(f"{args.model_dir} lacks {yaml_name}: not a {args.model} directory")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cosyvoice2",
                        help="the model --model-dir holds (or gets, built at full size)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--concurrency", type=levels_arg, default=levels_arg("1,4,16,64,128"))
    parser.add_argument("--modes", default="inproc", help="inproc,http")
    parser.add_argument("--upstream", type=levels_arg, default=[],
                        help="levels, e.g. 1,4 (cosyvoice2 only)")
    parser.add_argument("--tokens", type=int, default=240)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run on a tiny model")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--timeline", type=int, default=0, metavar="N",
                        help="in-process: print each level's first N prefill and audio calls")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--engine-option", type=engine_option, action="append", default=[],
                        help="NAME=JSON for the engine, in-process and in the worker, e.g. "
                             "first_chunk_tokens=10 or flow_steps=5")
    parser.add_argument("--live-option", action="append", default=[], metavar="NAME=V1,V2",
                        help="in-process: each level once per value of an option a warm "
                             f"engine takes ({', '.join(LIVE_OPTIONS)}), side by side "
                             "in one warm engine, with ratios against the first value; "
                             "repeat it for several options")
    args = parser.parse_args()
    # The engine's start-up figures (capacity, each stage's graphs and the memory they keep).
    logging.basicConfig(format="%(message)s")
    logging.getLogger("worker.engines.cosyvoice").setLevel(logging.INFO)
    args.engine_option = dict(args.engine_option)
    variants = live_variants(parser, args)
    if args.upstream and args.model != "cosyvoice2":
        parser.error("--upstream compares with upstream's CosyVoice2 (cosyvoice2-eu) only; "
                     f"no upstream package serves {args.model}")
    model_dir_arg(parser, args)
    out_dir = args.out.parent if args.out else Path(".")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report: dict[str, Any] = {"model": args.model, "device": device_name, "tokens": args.tokens,
                              "engine_options": args.engine_option}
    report["results"] = SavedRows(report, args.out)
    t = time.perf_counter()
    # On a GPU the engine states its own capacity (what fits in memory); levels beyond it wait
    # for free rows, as requests beyond capacity do in service.
    if args.device != "cuda":
        args.engine_option.setdefault("max_streams", max(max(args.concurrency), 8))
    engine = create_engine(model_dir=args.model_dir, device=args.device, dtype=args.dtype,
                           fixed_speech_tokens=args.tokens, **args.engine_option)
    engine.load()
    engine.warm_up()
    held = (f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
            f"{torch.cuda.memory_reserved() / 2**30:.1f} reserved" if args.device == "cuda" else "")
    print(f"engine loaded and warm in {time.perf_counter() - t:.1f} s, capacity "
          f"{engine.max_streams} streams "
          f"(KV pool {engine._require()[0].decoder.pool.nbytes() / 2**30:.1f} GiB{held})",
          flush=True)
    frontend = engine._require()[1]
    voice = frontend.voice_prompt(prompt_audio(), 16000, PROMPT_TEXT)
    features = engine.compute_voice(prompt_audio(), 16000, PROMPT_TEXT)
    engine.add_voice("bench", features)
    print(f"device {report['device']}; prompt tokens {voice.speech_tokens.shape[1]}; "
          f"speech tokens per request {args.tokens}", flush=True)
    passed = True
    if args.check:
        passed = all([check_audio_stages(engine, args.tokens), check_batched(engine)])
    modes = args.modes.split(",")
    if "inproc" in modes:
        asyncio.run(sweep_inproc(engine, args.concurrency, report["results"], args.timeline,
                                 variants))
    engine._require()[0].stop()
    text_ids, prompt_ids = frontend.encode(TEXT), frontend.encode(PROMPT_TEXT)
    del engine
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        print(f"in-process engine released: {torch.cuda.memory_reserved() / 2**30:.1f} GiB "
              "still reserved by this process", flush=True)
    if "http" in modes:
        sweep_http(args.model_dir, features, args.concurrency, args.tokens, args.dtype,
                   args.device, out_dir, args.engine_option, report["results"])
    if args.upstream:
        sweep_upstream(args.model_dir, args.upstream, voice, text_ids, prompt_ids, args.tokens,
                       report["results"])
    print(f"\nunderrun threshold {UNDERRUN_THRESHOLD_S * 1000:.0f} ms; audio per request "
          f"{args.tokens / 25:.1f} s")
    for row in report["results"]:
        print(f"{row['name']:<9} c={row['concurrency']:<4} ttfa p50 {row['ttfa_p50_ms']:6.0f} "
              f"p99 {row['ttfa_p99_ms']:6.0f} ms  {row['audio_s_per_s']:7.1f} audio-s/s  "
              f"rtf max {row['rtf_max']:.2f}  gap max {row['worst_gap_max_ms']:6.0f} ms  "
              f"ok {row['ok']}/{row['ok'] + row['failed']}  peak {row['peak_gpu_gib']:.1f} GiB")
    if variants:
        print_ratios(report["results"], variants)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
