"""CosyVoice2 served by this project's own PyTorch modules, loading the official checkpoints."""

from __future__ import annotations

from typing import Any

from worker.engines.cosyvoice.engine import CosyVoiceEngine


def create_engine(**options: Any) -> CosyVoiceEngine:
    """Options: `model_dir` (required), `device` ("cpu", "cuda", "cuda:1"...), `dtype`
    ("float32", "bfloat16", "float16"; the vocoder always runs in float32), `threads` (ONNX
    Runtime threads for prompt features), and for benchmarks only `fixed_speech_tokens` (decode
    exactly that many tokens per piece, ignoring end-of-speech).
    """
    if not options.get("model_dir"):
        raise ValueError("the cosyvoice engine needs model_dir (an official CosyVoice2 directory)")
    if options.get("voices_dir") is not None:
        raise ValueError("the cosyvoice engine takes no voices_dir (register voices instead)")
    options.pop("voices_dir", None)
    return CosyVoiceEngine(**options)


__all__ = ["CosyVoiceEngine", "create_engine"]
