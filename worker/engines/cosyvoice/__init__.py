"""CosyVoice2 served by this project's own PyTorch modules, loading the official checkpoints."""

from __future__ import annotations

from pathlib import Path

from worker.engines.cosyvoice.engine import CosyVoiceEngine


def create_engine(
    *,
    model_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
    voices_dir: str | Path | None = None,
    fixed_speech_tokens: int | None = None,
    warm_up_text: str = "Hello.",
    cuda_graph: bool = True,
    max_streams: int | None = None,
    max_positions: int = 3072,
    flow_steps: int = 10,
    max_audio_rows: int = 64,
    first_chunk_tokens: int = 25,
) -> CosyVoiceEngine:
    """The engine, from keyword options only; an option not named here fails start-up (the
    registry names it). `model_dir` (required), `device` ("cpu", "cuda", "cuda:1"...), `dtype`
    ("float32", "bfloat16", "float16"; the vocoder always runs in float32), `threads` (ONNX
    Runtime threads for prompt features; WORKER_THREADS), and for benchmarks only
    `fixed_speech_tokens` (decode exactly that many tokens per piece, ignoring end-of-speech).
    The others are `CosyVoiceEngine`'s.
    """
    if not model_dir:
        raise ValueError("the cosyvoice engine needs model_dir (an official CosyVoice2 directory)")
    if voices_dir is not None:
        raise ValueError("the cosyvoice engine takes no voices_dir (register voices instead)")
    return CosyVoiceEngine(
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        threads=threads,
        fixed_speech_tokens=fixed_speech_tokens,
        warm_up_text=warm_up_text,
        cuda_graph=cuda_graph,
        max_streams=max_streams,
        max_positions=max_positions,
        flow_steps=flow_steps,
        max_audio_rows=max_audio_rows,
        first_chunk_tokens=first_chunk_tokens,
    )


__all__ = ["CosyVoiceEngine", "create_engine"]
