"""CosyVoice2 and CosyVoice3 served by this project's own PyTorch modules, loading the official
checkpoints. One engine name, `cosyvoice`: the model is chosen by what the directory holds."""

from __future__ import annotations

from pathlib import Path

from worker.engines.cosyvoice.engine import CosyVoiceEngine, SpeechEngine
from worker.engines.cosyvoice.v3_config import YAML_NAME as V3_YAML
from worker.engines.cosyvoice.v3_engine import CosyVoice3Engine


def engine_class(model_dir: Path) -> type[SpeechEngine]:
    """CosyVoice3 for a directory holding `cosyvoice3.yaml`, else CosyVoice2 (whose start-up
    names what a directory holding neither model's yaml lacks)."""
    return CosyVoice3Engine if (model_dir / V3_YAML).is_file() else CosyVoiceEngine


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
    max_audio_rows: int | None = None,
    first_chunk_tokens: int | None = None,
    later_chunk_hops: int = 2,
    vocoder_graphs: bool = True,
    encoder_graph_rows: int | None = None,
    prefill_tokens: int = 2048,
    decode_priority: bool = False,
    first_chunk_gather_steps: int = 4,
    dit_graphs: bool | None = None,
    prompt_cache_mb: int = 2048,
) -> SpeechEngine:
    """The engine for the model in `model_dir` (`engine_class`), from keyword options only; an
    option not named here fails start-up (the registry names it). `model_dir` (required),
    `device` ("cpu", "cuda", "cuda:1"...), `dtype` ("float32", "bfloat16", "float16"; the
    vocoder always runs in float32), `threads` (ONNX Runtime threads for prompt features;
    WORKER_THREADS), and for benchmarks only `fixed_speech_tokens` (decode exactly that many
    tokens per piece, ignoring end-of-speech). The others are `SpeechEngine`'s; CosyVoice3
    takes `flow_steps` 10 only, and `encoder_graph_rows` is CosyVoice2's (`dit_graphs`
    CosyVoice3's: unset, it is on).
    """
    if not model_dir:
        raise ValueError("the cosyvoice engine needs model_dir (an official CosyVoice2 or "
                         "CosyVoice3 directory)")
    if voices_dir is not None:
        raise ValueError("the cosyvoice engine takes no voices_dir (register voices instead)")
    return engine_class(Path(model_dir))(
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
        later_chunk_hops=later_chunk_hops,
        vocoder_graphs=vocoder_graphs,
        encoder_graph_rows=encoder_graph_rows,
        prefill_tokens=prefill_tokens,
        decode_priority=decode_priority,
        first_chunk_gather_steps=first_chunk_gather_steps,
        dit_graphs=dit_graphs,
        prompt_cache_mb=prompt_cache_mb,
    )


__all__ = ["CosyVoice3Engine", "CosyVoiceEngine", "SpeechEngine", "create_engine",
           "engine_class"]
