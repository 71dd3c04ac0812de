"""The `cosyvoice` engine: CosyVoice2 or CosyVoice3 from an official model directory, streamed
token by token.

`stream()` validates a request into utterances and hands them to the engine's one `Scheduler`,
which batches every live request's LLM steps, flow chunks and vocoder chunks on the device; the
request's coroutine only reads its own queue of audio. Errors of a request are raised to its
caller; cancelling the stream removes the request from the batch at the next step.

`SpeechEngine` is what both models share: options, registered voices, turning a request into
utterances (`plan`), streaming, warm-up, capacity and capabilities. A model's engine says what
it loads and which LLM, audio stage and frontend it gives the scheduler: `CosyVoiceEngine` here,
`CosyVoice3Engine` in `v3_engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from contract.errors import ErrorCode, ServiceError
from contract.requests import piece_seed
from worker.engines.base import Audio, Capabilities, EngineRequest, VoiceInfo
from worker.engines.cosyvoice.batch_decode import (
    PREFILL_LENGTHS,
    BatchDecoder,
    SpeechModel,
    buckets,
)
from worker.engines.cosyvoice.capacity import (
    STREAM_BUDGET_S,
    WORKING_SHARE,
    StreamCost,
    default_audio_rows,
    flow_frame_bytes,
    prompt_cache_bytes,
    streams_that_fit,
)
from worker.engines.cosyvoice.config import (
    REQUIRED_FILES,
    ModelConfig,
    ModelDirError,
    check_model_dir,
)
from worker.engines.cosyvoice.decode import SlotPool
from worker.engines.cosyvoice.encoder_graphs import EncoderGraphs
from worker.engines.cosyvoice.flow import FlowModel
from worker.engines.cosyvoice.flow_graphs import SolverGraphs, later_chunk_widths
from worker.engines.cosyvoice.flow_state import FlowPages
from worker.engines.cosyvoice.frontend import Frontend, VoicePrompt
from worker.engines.cosyvoice.graphs import attention_without_cudnn
from worker.engines.cosyvoice.hift import HiFTGenerator
from worker.engines.cosyvoice.hift_graphs import VocoderGraphs
from worker.engines.cosyvoice.llm import SpeechLM
from worker.engines.cosyvoice.pipeline import TOKEN_HOP, AudioStage, Utterance
from worker.engines.cosyvoice.sampling import SamplingParams
from worker.engines.cosyvoice.scheduler import DONE, AudioStages, DecodeLimits, Scheduler
from worker.engines.cosyvoice.text import normalize, split_sentences
from worker.engines.cosyvoice.v3_config import YAML_NAME as V3_YAML
from worker.engines.cosyvoice.weights import (
    flow_state,
    hift_state,
    llm_state,
    load_into,
    qwen_config,
    read_state,
)
from worker.model_version import content_version

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_STREAMS = {"cpu": 8, "cuda": 128}
MIN_FIRST_CHUNK = 5
"""Tokens: below this, the vocoder's 8-frame overlap would hold back most of a first chunk."""
SPEAKERS_FILE = "spk2info.pt"
WARM_UP_PROMPT_S = 2.0
"""A model without built-in speakers warms up cloning a synthetic recording this long."""


class PromptedModel(SpeechModel, Protocol):
    """A speech LLM the engine can prompt (`SpeechLM`, `CosyVoice3LM`)."""

    def build_input(self, text_ids: torch.Tensor, prompt_speech_tokens: torch.Tensor
                    ) -> torch.Tensor: ...


GEMM_WORKSPACE_SETTINGS = {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}
"""cuBLAS and cuBLASLt with no workspace. The engine replays the decoder's graphs and the audio
stages' graphs at once, on two streams; with the libraries' default workspaces, 32 concurrent
streams on an H200 hung the GPU inside a flow graph (every replayed bucket ran alone), and with
none, 64 streams ran. Read when cuBLAS first starts in the process, so set before any GEMM."""


def turn_off_gemm_workspaces(device: torch.device) -> None:
    """Apply `GEMM_WORKSPACE_SETTINGS` for a CUDA device, keeping any value the operator set."""
    if device.type != "cuda":
        return
    for name, value in GEMM_WORKSPACE_SETTINGS.items():
        os.environ.setdefault(name, value)


class SpeechEngine:
    """The model-independent part of the engine. A subclass's `load` reads its directory and
    calls `_serve` with what it built; see `create_engine` for the options."""

    utterance_type: type[Utterance] = Utterance
    speed_range: tuple[float, float] = (0.5, 2.0)
    max_later_hops = 4
    """Hops a later chunk may take: the most the flow's and vocoder's graphs are built for."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        fixed_speech_tokens: int | None = None,
        warm_up_text: str = "Hello.",
        threads: int | None = None,
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
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        if first_chunk_tokens is not None and not (
                MIN_FIRST_CHUNK <= first_chunk_tokens <= TOKEN_HOP):
            raise ValueError(f"first_chunk_tokens must be {MIN_FIRST_CHUNK}..{TOKEN_HOP}, "
                             f"not {first_chunk_tokens}")
        if not 1 <= later_chunk_hops <= self.max_later_hops:
            raise ValueError(f"later_chunk_hops must be 1..{self.max_later_hops}, "
                             f"not {later_chunk_hops}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        turn_off_gemm_workspaces(self.device)
        self.dtype = DTYPES[dtype]
        self.fixed_speech_tokens = fixed_speech_tokens
        self.warm_up_text = warm_up_text
        self.threads = threads or 1
        self.cuda_graph = cuda_graph
        self.max_streams = max_streams or DEFAULT_STREAMS.get(self.device.type, 8)
        self._size_streams_to_memory = max_streams is None and self.device.type == "cuda"
        self.max_positions = max_positions
        self.flow_steps = flow_steps
        self.max_audio_rows = max_audio_rows or default_audio_rows(self.device)
        self.first_chunk_tokens = first_chunk_tokens
        self.later_chunk_hops = later_chunk_hops
        self.vocoder_graphs = vocoder_graphs
        if encoder_graph_rows is None:
            encoder_graph_rows = self.max_audio_rows
        if not 1 <= encoder_graph_rows <= self.max_audio_rows:
            raise ValueError("encoder_graph_rows must be 1..max_audio_rows "
                             f"({self.max_audio_rows}), not {encoder_graph_rows}")
        self.encoder_graph_rows = encoder_graph_rows
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be positive, not {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        self.decode_priority = decode_priority
        if first_chunk_gather_steps < 0:
            raise ValueError("first_chunk_gather_steps must be 0 or more, "
                             f"not {first_chunk_gather_steps}")
        self.first_chunk_gather_steps = first_chunk_gather_steps
        self.dit_graphs = dit_graphs
        if prompt_cache_mb < 0:
            raise ValueError(f"prompt_cache_mb must be 0 or more, not {prompt_cache_mb}")
        self.prompt_cache_bytes = prompt_cache_mb * 2**20
        self._frames_per_second = 50.0
        """Mel frames per second of audio (read from the model at load)."""
        self._scheduler: Scheduler | None = None
        self._audio: AudioStages | None = None
        self._llm: PromptedModel | None = None
        self._mel_bins = 0
        self._frontend: Frontend | None = None
        self._speakers: dict[str, torch.Tensor] = {}
        self._voices: dict[str, VoicePrompt] = {}
        self._version = ""

    # -- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read and check every file; a missing or mismatched one raises `ModelDirError`."""
        raise NotImplementedError

    def _serve(self, llm: PromptedModel, sampling: SamplingParams, audio: AudioStages,
               mel_bins: int, frontend: Frontend, files: tuple[str, ...]) -> None:
        """Put the loaded parts to work: the batched decoder over `llm` (its KV pool sized to
        `max_streams`), the scheduler over it and `audio` (whose flow makes `mel_bins`-wide
        frames), and the model version (a digest of `files`)."""
        graphs = self.cuda_graph and self.device.type == "cuda"
        decoder = BatchDecoder(llm, sampling, slots=self.max_streams,
                               positions=self.max_positions, use_graphs=self.cuda_graph,
                               prefill_lengths=PREFILL_LENGTHS if graphs else ())
        self._llm = llm
        self._audio = audio
        self._mel_bins = mel_bins
        self._frontend = frontend
        self._scheduler = Scheduler(
            decoder, audio, self._embed, DecodeLimits(fixed_tokens=self.fixed_speech_tokens),
            max_audio_rows=self.max_audio_rows, prefill_budget=self.prefill_tokens,
            decode_priority=self.decode_priority, gather_steps=self.first_chunk_gather_steps,
        )
        self._version = content_version(self.model_dir, files)

    def _streams_in_memory(self, llm: SpeechModel, frame_bytes: int, frames_per_second: int,
                           frame_quantum: int = 1) -> int:
        """`DEFAULT_STREAMS` on this device, or fewer when their memory would not fit: each
        stream's KV row and `STREAM_BUDGET_S` of flow state at `frame_bytes` per mel frame
        (allocated `frame_quantum` frames at a time), in what is free less the prompt cache's
        budget (`prompt_cache_bytes`)."""
        cost = StreamCost(
            kv_row_bytes=SlotPool.row_bytes(llm.backbone, self.max_positions),
            flow_frame_bytes=frame_bytes,
            frames_per_second=frames_per_second,
            frame_quantum=frame_quantum,
        )
        free, total = torch.cuda.mem_get_info(self.device)
        free = max(0, free - prompt_cache_bytes(self.prompt_cache_bytes, total))
        streams = streams_that_fit(free, total, cost, self.max_streams)
        logger.info("Capacity %d streams: %.0f MB each (KV row and %.0f s of flow state), "
                    "%.1f of %.1f GiB free", streams, cost.bytes() / 1e6, STREAM_BUDGET_S,
                    free / 2**30, total / 2**30)
        return streams

    def _bound_prompt_cache(self) -> None:
        """On a GPU, the prompt cache's budget within its share of the device."""
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            self.prompt_cache_bytes = prompt_cache_bytes(self.prompt_cache_bytes, total)

    @staticmethod
    def _read_speakers(path: Path) -> dict[str, torch.Tensor]:
        try:
            info = torch.load(path, map_location="cpu", weights_only=True)
            return {str(k): v["embedding"].float().reshape(1, -1) for k, v in info.items()}
        except Exception as e:
            raise ModelDirError(f"{path} is not a speaker table with embeddings: {e!r}") from e

    def _capture_graphs(self) -> None:
        """Capture the audio stages' CUDA graphs, if the model has any (warm-up)."""

    def _capture_each(self, graphs: tuple[tuple[Any, str, str], ...]) -> None:
        """Capture each `(owner, attribute, stage)`'s graphs (None: none); a capture that fails
        leaves that stage eager, with a warning."""
        for owner, attribute, stage in graphs:
            captured = getattr(owner, attribute)
            if captured is None:
                continue
            try:
                with self._capture_logged(stage):
                    captured.capture()
            except RuntimeError:
                logger.warning("Capturing the %s's graphs failed; it runs eagerly", stage,
                               exc_info=True)
                setattr(owner, attribute, None)

    @contextlib.contextmanager
    def _capture_logged(self, stage: str) -> Iterator[None]:
        """Log how long a stage's capture took and the device memory it left reserved (its
        graphs' private pool, which no other allocation can use)."""
        if self.device.type != "cuda":  # nothing is captured
            yield
            return
        before = torch.cuda.memory_reserved(self.device)
        started = time.perf_counter()
        yield
        added = torch.cuda.memory_reserved(self.device) - before
        logger.info("Captured the %s's graphs in %.1f s: %.2f GiB more reserved", stage,
                    time.perf_counter() - started, added / 2**30)

    def warm_up(self) -> None:
        """Capture the graphs (decode step, then the model's own), then one short synthesis
        through every stage, so readiness proves the model runs."""
        scheduler, _ = self._require()
        with self._capture_logged("decoder"):
            scheduler.decoder.capture()
        self._capture_graphs()
        scheduler.start()
        request = EngineRequest(text=self.warm_up_text, voice=self.default_voice, speed=1.0, seed=0)
        if not self.default_voice:
            request = replace(request, prompt_audio=_warm_up_prompt(), prompt_sample_rate=16000)

        async def run() -> int:
            n = 0
            async for chunk in self.stream(request):
                n += chunk.size
            return n

        # A private thread with its own loop: start-up may itself be running inside a loop.
        with ThreadPoolExecutor(max_workers=1) as pool:
            produced = pool.submit(asyncio.run, run()).result()
        if produced == 0:
            raise RuntimeError("warm-up produced no audio")
        if self._size_streams_to_memory:
            self._fit_streams_after_warm_up(scheduler)

    def _fit_streams_after_warm_up(self, scheduler: Scheduler) -> None:
        """Lower the stated capacity to the streams that fit now that warm-up allocated what
        sizing at load could not see (`_streams_once_warm`)."""
        streams = self._streams_once_warm()
        if streams < self.max_streams:
            scheduler.limit_rows(streams)
            self.max_streams = streams

    # -- the flow states' store ---------------------------------------------------------------

    def _page_bytes(self, flow: Any) -> int:
        """Bytes of one page of the flow states' store."""
        raise NotImplementedError

    def _stream_pages(self, flow: Any) -> int:
        """Pages of the store a stream is planned on: `STREAM_BUDGET_S` of frames."""
        raise NotImplementedError

    def _budget_chunks(self, grid: int) -> int:
        """Chunks of `grid` mel frames in `STREAM_BUDGET_S` of audio."""
        return -(-int(STREAM_BUDGET_S * self._frames_per_second) // grid)

    def _flow_store(self, flow: Any, pages: int) -> FlowPages:
        """The flow's store of states, made with `pages` pages if it has none yet."""
        raise NotImplementedError

    def _audio_flow(self) -> Any:
        """The flow of the audio stage being served."""
        raise NotImplementedError

    def _cache_pages(self, page_bytes: int) -> int:
        return -(-self.prompt_cache_bytes // page_bytes)

    def _pages_wanted(self, flow: Any) -> int:
        """Pages for `max_streams` streams, the prompt cache and the scratch page."""
        return (self.max_streams * self._stream_pages(flow)
                + self._cache_pages(self._page_bytes(flow)) + 1)

    def _make_flow_pages(self, flow: Any) -> None:
        """The flow states' store, made before the flow's graphs are captured over it: for
        `max_streams` streams and the prompt cache, or (capacity sized to the device) fewer,
        in what is free once the other stages' graphs are in place, less the working share.
        Only what the driver has free counts: the blocks the graphs' private pools hold are
        reserved but serve no other allocation."""
        pages = self._pages_wanted(flow)
        if self._size_streams_to_memory:
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            room = int(free - WORKING_SHARE * total) // self._page_bytes(flow)
            pages = max(2, min(pages, room))
        store = self._flow_store(flow, pages)
        logger.info("Flow states' store: %d pages of %.1f MB (%.1f GiB), %d streams of %d "
                    "pages and the prompt cache's %d", store.pages, store.page_bytes / 1e6,
                    store.pages * store.page_bytes / 2**30, self._streams_in_store(flow),
                    self._stream_pages(flow), self._cache_pages(store.page_bytes))

    def _streams_in_store(self, flow: Any) -> int:
        store: FlowPages | None = flow.pages
        assert store is not None
        usable = store.pages - 1 - self._cache_pages(store.page_bytes)
        return max(1, min(self.max_streams, usable // self._stream_pages(flow)))

    def _streams_once_warm(self) -> int:
        """The streams whose flow states the store holds (the KV rows are in place)."""
        streams = self._streams_in_store(self._audio_flow())
        if streams < self.max_streams:
            logger.warning("Capacity lowered from %d to %d streams: what the flow states' "
                           "store holds", self.max_streams, streams)
        return streams

    # -- description --------------------------------------------------------------------------

    @property
    def default_voice(self) -> str:
        return next(iter(self._speakers), "")

    def modes(self) -> tuple[str, ...]:
        return ("sft", "zero_shot", "cross_lingual", "instruct2")

    def capabilities(self) -> Capabilities:
        voices = tuple(
            VoiceInfo(id=name, name=name, language="zh" if not name.isascii() else "en",
                      description="built-in speaker")
            for name in self._speakers
        )
        return Capabilities(
            engine="cosyvoice",
            model=self.model_dir.name,
            model_version=self._version,
            sample_rate=self._require()[0].audio.sample_rate,
            modes=self.modes(),
            languages=("zh", "en"),
            voices=voices,
            default_voice=self.default_voice,
            supports_cloning=True,
            supports_instructions=True,
            speed_range=self.speed_range,
            max_streams=self.max_streams,
        )

    def _require(self) -> tuple[Scheduler, Frontend]:
        if self._scheduler is None or self._frontend is None:
            raise RuntimeError("engine used before load()")
        return self._scheduler, self._frontend

    def _embed(self, utt: Utterance) -> torch.Tensor:
        assert self._llm is not None
        text = torch.tensor([utt.text_ids], dtype=torch.long, device=self.device)
        return self._llm.build_input(text, utt.llm_prompt_tokens.to(self.device))

    # -- registered voices ----------------------------------------------------------------------

    def compute_voice(self, audio: np.ndarray, sample_rate: int, text: str = "") -> bytes:
        """Prompt features of a recording, serialised for storage (see `VoicePrompt.to_bytes`).

        The blob names this model's version; a request that brings a blob made by another
        version is refused (`voice_outdated`) rather than spoken with mismatched features.
        """
        _, frontend = self._require()
        prompt = frontend.voice_prompt(audio, sample_rate, text)
        return replace(prompt, model_version=self._version).to_bytes()

    def add_voice(self, voice_id: str, data: bytes) -> None:
        """Make stored prompt features usable as `voice=voice_id` in this process."""
        self._voices[voice_id] = VoicePrompt.from_bytes(data)

    def remove_voice(self, voice_id: str) -> None:
        self._voices.pop(voice_id, None)

    def _stored_prompt(self, data: bytes) -> VoicePrompt:
        """A registered voice's features; 422 when they were computed by another model version.

        Parsing costs about 1.5 ms for a 10-30 s prompt (160-480 kB), next to seconds of
        synthesis, so blobs are parsed per request rather than cached.
        """
        prompt = VoicePrompt.from_bytes(data)
        if prompt.model_version != self._version:
            raise ServiceError(
                ErrorCode.VOICE_OUTDATED,
                "The voice was registered with another model version; register it again.",
            )
        return prompt

    # -- synthesis ------------------------------------------------------------------------------

    def plan(self, request: EngineRequest) -> list[Utterance]:
        """Validate and turn a request into utterances; raises `ServiceError` (4xx) on bad input."""
        _, frontend = self._require()
        low, high = self.speed_range
        if not low <= request.speed <= high:
            raise ServiceError(ErrorCode.SPEED_OUT_OF_RANGE,
                               f"This model speaks at speed {low:g} to {high:g}.")
        prompt: VoicePrompt | None = None
        speaker: torch.Tensor | None = None
        if request.prompt_audio is not None:
            prompt = frontend.voice_prompt(
                request.prompt_audio, request.prompt_sample_rate or 16000, request.prompt_text or ""
            )
        elif request.voice_features is not None:
            prompt = self._stored_prompt(request.voice_features)
        elif request.voice in self._voices:
            prompt = self._voices[request.voice]
        elif request.voice in self._speakers:
            speaker = self._speakers[request.voice]
        else:
            raise ServiceError(ErrorCode.UNKNOWN_VOICE, f"Unknown voice {request.voice!r}.")
        instruction = (request.instruction or "").strip()
        if instruction and prompt is not None and prompt.text:
            raise ServiceError(
                ErrorCode.INSTRUCTION_UNSUPPORTED,
                "An instruction cannot be combined with a prompt transcript (zero-shot mode).",
            )
        empty_tokens = torch.zeros(1, 0, dtype=torch.int32)
        if prompt is not None:
            embedding = prompt.embedding
            flow_tokens, prompt_mel = prompt.speech_tokens, prompt.mel
        else:
            assert speaker is not None
            embedding = speaker
            flow_tokens, prompt_mel = empty_tokens, torch.zeros(1, 0, self._mel_bins)
        llm_tokens = empty_tokens
        if instruction:
            head = frontend.prompt.instruct(instruction)
        elif prompt is not None and prompt.text:
            head = frontend.prompt.zero_shot(prompt.text)
            llm_tokens = prompt.speech_tokens
        else:
            head = frontend.prompt.plain()
        prefix = frontend.encode(head) if head else []
        pieces = split_sentences(normalize(request.text), frontend.count_tokens)
        if not pieces:
            raise ServiceError(ErrorCode.TEXT_EMPTY, "Text is empty after normalisation.")
        utterances = []
        for i, piece in enumerate(pieces):
            ids = frontend.encode(piece)
            utterances.append(
                self.utterance_type(
                    text_ids=prefix + ids,
                    tts_token_count=len(ids),
                    llm_prompt_tokens=llm_tokens,
                    flow_prompt_tokens=flow_tokens,
                    prompt_mel=prompt_mel,
                    embedding=embedding,
                    seed=piece_seed(request.seed, i),
                    speed=request.speed,
                    first_chunk=self.first_chunk_tokens,
                    later_hops=self.later_chunk_hops,
                )
            )
        return utterances

    async def stream(self, request: EngineRequest) -> AsyncIterator[Audio]:
        """Audio chunks (float32, 24 kHz) in order; validation errors come before the first."""
        utterances = await asyncio.to_thread(self.plan, request)
        async for chunk in self.stream_planned(utterances, request.deadline):
            yield chunk

    async def stream_planned(self, utterances: list[Utterance], deadline: float | None
                             ) -> AsyncIterator[Audio]:
        """`stream` for utterances `plan` made (which then hold the speech tokens drawn)."""
        scheduler, _ = self._require()
        scheduler.start()
        job = scheduler.submit(utterances, deadline)
        try:
            while True:
                item = await job.queue.get()
                if item is DONE:
                    return
                if isinstance(item, ServiceError):
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError("speech synthesis failed") from item
                assert isinstance(item, np.ndarray)
                yield item
        finally:
            scheduler.cancel(job)


def _warm_up_prompt() -> np.ndarray:
    """A voiced 16 kHz recording (a 170 Hz tone with harmonics and a slow tremolo)."""
    t = np.arange(int(WARM_UP_PROMPT_S * 16000)) / 16000
    tone = sum(np.sin(2 * np.pi * 170 * k * t) / k for k in (1, 2, 3))
    return (0.2 * tone * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


class CosyVoiceEngine(SpeechEngine):
    """CosyVoice2 on this package's modules. See `create_engine` for the options."""

    def __init__(self, model_dir: str | Path, **options: Any) -> None:
        super().__init__(model_dir, **options)
        if self.dit_graphs is not None:
            raise ValueError("dit_graphs is CosyVoice3's option; CosyVoice2's flow replays its "
                             "graphs with cuda_graph")

    def load(self) -> None:
        """Read and check every file; a missing or mismatched one raises `ModelDirError`."""
        yamls = (REQUIRED_FILES[0], V3_YAML)
        if self.model_dir.is_dir() and not any((self.model_dir / n).is_file() for n in yamls):
            raise ModelDirError(f"Model directory {self.model_dir} lacks {yamls[0]} "
                                f"(CosyVoice2) and {yamls[1]} (CosyVoice3).")
        config = check_model_dir(self.model_dir)
        self._frames_per_second = config.mel.sampling_rate / config.mel.hop_size
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            attention_without_cudnn(self.device)
        llm = SpeechLM(config.llm, qwen_config(self.model_dir))
        load_into(llm, llm_state(read_state(self.model_dir / "llm.pt")), self.model_dir / "llm.pt")
        flow = FlowModel(config.flow)
        load_into(flow, flow_state(read_state(self.model_dir / "flow.pt")),
                  self.model_dir / "flow.pt")
        hift = HiFTGenerator(config.hift)
        load_into(hift, hift_state(read_state(self.model_dir / "hift.pt")),
                  self.model_dir / "hift.pt")
        llm.to(self.device, self.dtype).eval()
        flow.to(self.device, self.dtype).eval()
        flow.noise = flow.noise.float()
        hift.to(self.device).eval()
        self._speakers = self._read_speakers(self.model_dir / SPEAKERS_FILE)
        frontend = Frontend(self.model_dir, config.mel, config.flow.token_mel_ratio,
                            onnx_threads=self.threads)
        sampling = SamplingParams(config.llm.top_p, config.llm.top_k, config.llm.win_size,
                                  config.llm.tau_r)
        if self.cuda_graph and self.device.type == "cuda":
            rows = buckets(self.max_audio_rows)
            flow.solver_graphs = SolverGraphs(
                flow.solver, self.dtype, self.device, steps=self.flow_steps,
                rows=tuple(r for r in rows if r <= 8), wide_rows=tuple(r for r in rows if r > 8),
                later_frames=later_chunk_widths(
                    self.later_chunk_hops, config.flow.estimator.static_chunk_size,
                    config.flow.pre_lookahead_len * config.flow.token_mel_ratio))
            flow.encoder_graphs = EncoderGraphs(
                flow.encode_tokens, config.flow.pre_lookahead_len,
                config.flow.encoder.upsample_stride, self.device,
                rows=tuple(buckets(self.encoder_graph_rows)))
        if self._size_streams_to_memory:
            self.max_streams = self._streams_that_fit(llm, flow, config)
        self._bound_prompt_cache()
        if self.device.type != "cuda":  # else sized at warm-up, before the solver's capture
            flow.flow_pages(self.flow_steps)  # small: it grows as streams need
        audio = AudioStage(flow, hift, self.device, flow_steps=self.flow_steps,
                           prompt_state_bytes=self.prompt_cache_bytes)
        if self.vocoder_graphs and self.cuda_graph and self.device.type == "cuda":
            audio.vocoder_graphs = VocoderGraphs(hift, self.device,
                                                 audio.streamed_shapes(self.later_chunk_hops))
        self._serve(llm, sampling, audio, config.flow.output_size, frontend, REQUIRED_FILES)

    def _streams_that_fit(self, llm: SpeechLM, flow: FlowModel, config: ModelConfig) -> int:
        """`DEFAULT_STREAMS` on this device, or fewer when their memory would not fit."""
        return self._streams_in_memory(llm, self._frame_bytes(flow),
                                       config.mel.sampling_rate // config.mel.hop_size)

    def _frame_bytes(self, flow: FlowModel) -> int:
        """Bytes of flow state per mel frame."""
        estimator = flow.decoder.estimator
        return flow_frame_bytes(self.flow_steps, estimator.attention_blocks,
                                estimator.cfg.channels[0], torch.finfo(self.dtype).bits // 8)

    def _page_bytes(self, flow: FlowModel) -> int:
        return self._frame_bytes(flow) * flow.cfg.estimator.static_chunk_size

    def _stream_pages(self, flow: FlowModel) -> int:
        return self._budget_chunks(flow.cfg.estimator.static_chunk_size)

    def _flow_store(self, flow: FlowModel, pages: int) -> FlowPages:
        return flow.flow_pages(self.flow_steps, pages)

    def _audio_flow(self) -> FlowModel:
        audio = self._audio
        assert isinstance(audio, AudioStage)
        return audio.flow

    def _capture_graphs(self) -> None:
        """The encoder's and the vocoder's graphs, then the flow states' store sized to what
        is left, then the solver's graphs over it; a capture that fails leaves that stage
        eager, with a warning."""
        audio = self._audio
        assert isinstance(audio, AudioStage)
        flow = audio.flow
        self._capture_each(((flow, "encoder_graphs", "encoder"),
                            (audio, "vocoder_graphs", "vocoder")))
        if self.device.type == "cuda":
            self._make_flow_pages(flow)
        if flow.solver_graphs is not None:
            flow.solver_graphs.pages = flow.pages
        self._capture_each(((flow, "solver_graphs", "flow"),))
