"""GPU smoke benchmark: this project's CosyVoice2 engine beside the upstream implementation.

Builds a full-size random-weight model directory (Qwen2-0.5B shape, released flow and HiFT
dimensions), then streams the same zero-shot request through both implementations at concurrency
1 on the same GPU and reports time to first audio and real-time factor. Random weights never end
speech, so both decode a fixed number of speech tokens (20 per text token, upstream's cap).

    python benchmarks/gpu_cosyvoice.py --model-dir /tmp/cv_full --runs 3 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cosyvoice_tiny import build_model_dir
from worker.engines.base import EngineRequest
from worker.engines.cosyvoice.engine import CosyVoiceEngine
from worker.engines.cosyvoice.frontend import VoicePrompt

SR = 24000
TEXT = "Hello world, this is a test."
PROMPT_TEXT = "Hello world, this is a prompt."


def prompt_audio(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * 160 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return wav.astype(np.float32)


async def run_ours(engine: CosyVoiceEngine, request: EngineRequest) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    samples = 0
    async for chunk in engine.stream(request):
        if first is None:
            first = time.perf_counter() - start
        samples += chunk.size
    wall = time.perf_counter() - start
    return {"ttfa_s": first or wall, "wall_s": wall, "audio_s": samples / SR}


def check_concurrent(engine: CosyVoiceEngine, request: EngineRequest) -> None:
    """Three requests at once give the same audio as one alone (no shared state, no races)."""

    async def collect() -> np.ndarray:
        return np.concatenate([c async for c in engine.stream(request)])

    async def together() -> list[np.ndarray]:
        return list(await asyncio.gather(collect(), collect(), collect()))

    solo = asyncio.run(collect())
    outs = asyncio.run(together())
    same = [bool(np.array_equal(o, solo)) for o in outs]
    close = [float(np.abs(o - solo).max()) if o.shape == solo.shape else -1.0 for o in outs]
    print(f"  concurrent x3 identical to solo: {same} (max abs diff {close})", flush=True)


def bench_ours(model_dir: Path, dtype: str, tokens: int, runs: int,
               voice: bytes, cuda_graph: bool) -> list[dict[str, float]]:
    engine = CosyVoiceEngine(model_dir, device="cuda", dtype=dtype, fixed_speech_tokens=tokens,
                             cuda_graph=cuda_graph)
    engine.load()
    engine.warm_up()
    engine.add_voice("prompt", voice)
    request = EngineRequest(text=TEXT, voice="prompt", speed=1.0, seed=1)
    print(f"ours {dtype} graph={cuda_graph}: loaded and warm", flush=True)
    check_concurrent(engine, request)
    results = []
    for i in range(runs + 1):
        row = asyncio.run(run_ours(engine, request))
        print(f"  ours {dtype} run {i}: {row}", flush=True)
        if i > 0:
            results.append(row)
    del engine
    torch.cuda.empty_cache()
    return results


def _shims() -> None:
    fu = types.ModuleType("cosyvoice.utils.file_utils")
    fu.logging = logging  # type: ignore[attr-defined]
    fu.convert_onnx_to_trt = None  # type: ignore[attr-defined]
    fu.export_cosyvoice2_vllm = None  # type: ignore[attr-defined]
    sys.modules["cosyvoice.utils.file_utils"] = fu
    spec = importlib.util.find_spec("matcha")
    assert spec is not None
    assert spec.origin is not None
    mu = types.ModuleType("matcha.utils")
    mu.__path__ = [str(Path(spec.origin).parent / "utils")]
    sys.modules["matcha.utils"] = mu
    importlib.import_module("matcha").utils = mu
    pl = types.ModuleType("matcha.utils.pylogger")
    pl.get_pylogger = logging.getLogger  # type: ignore[attr-defined]
    sys.modules["matcha.utils.pylogger"] = pl
    audio = types.ModuleType("matcha.utils.audio")

    def mel_spectrogram(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    audio.mel_spectrogram = mel_spectrogram  # type: ignore[attr-defined]
    sys.modules["matcha.utils.audio"] = audio
    mu.audio = audio  # type: ignore[attr-defined]


def bench_upstream(model_dir: Path, runs: int, voice: VoicePrompt, text_ids: list[int],
                   prompt_ids: list[int]) -> list[dict[str, float]]:
    _shims()
    warnings.simplefilter("ignore")
    from cosyvoice.cli.model import CosyVoice2Model
    from hyperpyyaml import load_hyperpyyaml

    with (model_dir / "cosyvoice2.yaml").open() as f:
        configs = load_hyperpyyaml(
            f, overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
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
    results = []
    for i in range(runs + 1):
        torch.manual_seed(i)
        start = time.perf_counter()
        first = None
        samples = 0
        for out in model.tts(**inputs, stream=True):
            if first is None:
                first = time.perf_counter() - start
            samples += out["tts_speech"].shape[1]
        wall = time.perf_counter() - start
        row = {"ttfa_s": first or wall, "wall_s": wall, "audio_s": samples / SR}
        print(f"  upstream run {i}: {row}", flush=True)
        if i > 0:
            results.append(row)
    return results


def summary(name: str, rows: list[dict[str, float]]) -> dict[str, Any]:
    ttfa = statistics.median(r["ttfa_s"] for r in rows)
    rtf = statistics.median(r["wall_s"] / r["audio_s"] for r in rows)
    audio = statistics.median(r["audio_s"] for r in rows)
    print(f"{name:<28} ttfa {ttfa * 1000:8.0f} ms   rtf {rtf:6.3f}   audio {audio:5.1f} s")
    return {"name": name, "ttfa_s": ttfa, "rtf": rtf, "audio_s": audio, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-upstream", action="store_true")
    parser.add_argument("--variants", default="bfloat16:graph,float16:graph,bfloat16:eager",
                        help="comma-separated dtype:graph|eager runs of this engine")
    args = parser.parse_args()
    if not (args.model_dir / "flow.pt").exists():
        t = time.perf_counter()
        build_model_dir(args.model_dir, size="full")
        print(f"built full-size model dir in {time.perf_counter() - t:.0f} s")
    print("preparing prompt features", flush=True)
    probe = CosyVoiceEngine(args.model_dir)
    probe.load()
    frontend = probe._require()[1]
    voice = frontend.voice_prompt(prompt_audio(), 16000, PROMPT_TEXT)
    text_ids = frontend.encode(TEXT)
    prompt_ids = frontend.encode(PROMPT_TEXT)
    tokens = 20 * len(text_ids)
    del probe
    print(f"device {torch.cuda.get_device_name()}; text tokens {len(text_ids)}; "
          f"speech tokens {tokens}; prompt tokens {voice.speech_tokens.shape[1]}")
    report = []
    variants = [v.split(":") for v in args.variants.split(",") if v]
    for dtype, mode in variants:
        graph = mode == "graph"
        rows = bench_ours(args.model_dir, dtype, tokens, args.runs, voice.to_bytes(), graph)
        report.append(summary(f"ours {dtype}{' graph' if graph else ' eager'}", rows))
    if not args.skip_upstream:
        rows = bench_upstream(args.model_dir, args.runs, voice, text_ids, prompt_ids)
        report.append(summary("upstream fp16 (cosyvoice2-eu)", rows))
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                        "results": report}, indent=2))


if __name__ == "__main__":
    main()
