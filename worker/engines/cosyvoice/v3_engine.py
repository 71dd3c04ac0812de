"""The `cosyvoice` engine on a CosyVoice3 directory: the same scheduler, voices and requests as
CosyVoice2 (`engine.SpeechEngine`), with CosyVoice3's LLM, DiT flow and causal vocoder.

What differs from CosyVoice2: the files it reads (`cosyvoice3.yaml`, `speech_tokenizer_v3.onnx`;
`spk2info.pt` is optional, and sft is served only when it is there), the frontend's data
(`v3_frontend`), the scheduler's audio stage (`V3AudioStage`: incremental DiT flow and streamed
causal vocoder), and speed: the released streaming has no speed control (upstream changes speed
only in non-streaming mode, by stretching a whole mel), and stretching chunk by chunk would not
be the same audio as stretching the whole, so the engine states speed 1.0 only and refuses any
other with 422 `speed_out_of_range` before audio. The LLM's decode step is replayed from graphs
as for CosyVoice2; so are the flow's estimator steps (`v3_flow_graphs`) unless `dit_graphs` is
false, and the vocoder's decoder (`v3_hift_graphs`) unless `vocoder_graphs` is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worker.engines.cosyvoice.batch_decode import buckets
from worker.engines.cosyvoice.engine import SPEAKERS_FILE, SpeechEngine
from worker.engines.cosyvoice.flow_graphs import later_chunk_widths
from worker.engines.cosyvoice.flow_state import FlowPages
from worker.engines.cosyvoice.frontend import END_OF_PROMPT, Frontend
from worker.engines.cosyvoice.graphs import attention_without_cudnn
from worker.engines.cosyvoice.sampling import SamplingParams
from worker.engines.cosyvoice.v3_config import REQUIRED_FILES, V3ModelConfig, check_v3_model_dir
from worker.engines.cosyvoice.v3_flow import NOISE_FRAMES, STEPS, CosyVoice3Flow, load_v3_flow
from worker.engines.cosyvoice.v3_flow_graphs import DiTStepGraphs
from worker.engines.cosyvoice.v3_frontend import COSYVOICE3
from worker.engines.cosyvoice.v3_hift import HiFTNoise, load_v3_hift, samples_per_frame
from worker.engines.cosyvoice.v3_hift_graphs import V3VocoderGraphs, chunk_frames
from worker.engines.cosyvoice.v3_llm import CosyVoice3LM, load_v3_llm
from worker.engines.cosyvoice.v3_pipeline import V3AudioStage, V3Utterance


class CosyVoice3Engine(SpeechEngine):
    """CosyVoice3 (Fun-CosyVoice3-0.5B) on this package's modules; options as `create_engine`'s
    (`flow_steps` must be the released 10)."""

    utterance_type = V3Utterance
    speed_range = (1.0, 1.0)

    def __init__(self, model_dir: str | Path, **options: Any) -> None:
        super().__init__(model_dir, **options)
        if self.flow_steps != STEPS:
            raise ValueError(f"CosyVoice3's flow runs {STEPS} Euler steps; flow_steps must be "
                             f"{STEPS}, not {self.flow_steps}")

    def modes(self) -> tuple[str, ...]:
        cloning = ("zero_shot", "cross_lingual", "instruct2")
        return ("sft", *cloning) if self._speakers else cloning

    def load(self) -> None:
        """Read and check every file; a missing or mismatched one raises `ModelDirError`."""
        config = check_v3_model_dir(self.model_dir)
        self._frames_per_second = config.mel.sampling_rate / config.mel.hop_size
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            attention_without_cudnn(self.device)
        speakers = self.model_dir / SPEAKERS_FILE
        self._speakers = self._read_speakers(speakers) if speakers.exists() else {}
        frontend = Frontend(self.model_dir, config.mel, config.flow.token_mel_ratio,
                            onnx_threads=self.threads, spec=COSYVOICE3)
        llm = load_v3_llm(self.model_dir, config.llm, frontend.token_id(END_OF_PROMPT))
        flow = load_v3_flow(self.model_dir, config.flow)
        hift = load_v3_hift(self.model_dir, config.hift, config.conv_pre_look_right)
        # The noise (drawn in float32) and the rotary frequencies stay float32, whatever the
        # flow's dtype: in bfloat16 a frequency is off by up to 0.4%, radians by frame 900.
        flow_noise = flow.noise
        rotary = flow.estimator.rotary_embed
        inv_freq = rotary.inv_freq
        llm.to(self.device, self.dtype)
        flow.to(self.device, self.dtype)
        flow.noise = flow_noise.to(self.device)
        rotary.inv_freq = inv_freq.to(self.device)
        hift.to(self.device)
        sampling = SamplingParams(config.llm.top_p, config.llm.top_k, config.llm.win_size,
                                  config.llm.tau_r)
        if self.dit_graphs is not False and self.cuda_graph and self.device.type == "cuda":
            flow.step_graphs = DiTStepGraphs(
                flow.estimator, self.device, self.dtype, rows=tuple(buckets(self.max_audio_rows)),
                later_frames=later_chunk_widths(
                    self.later_chunk_hops, config.flow.dit.static_chunk_size,
                    config.flow.pre_lookahead_len * config.flow.token_mel_ratio))
        if self._size_streams_to_memory:
            self.max_streams = self._streams_that_fit(llm, flow, config)
        self._bound_prompt_cache()
        audio = V3AudioStage(flow, hift, self._vocoder_noise(config), self.device,
                             prompt_state_bytes=self.prompt_cache_bytes)
        if self.vocoder_graphs and self.cuda_graph and self.device.type == "cuda":
            audio.vocoder_graphs = V3VocoderGraphs(
                hift, self.device, rows=tuple(buckets(self.max_audio_rows)),
                frames=chunk_frames(self.later_chunk_hops, config.flow.dit.static_chunk_size))
        files = REQUIRED_FILES + ((SPEAKERS_FILE,) if self._speakers else ())
        self._serve(llm, sampling, audio, config.flow.output_size, frontend, files)

    def _capture_graphs(self) -> None:
        """The vocoder's graphs (unless `vocoder_graphs` is false), then the flow's store of
        keys and values sized to what is left, then the flow's per-step estimator graphs over
        it (unless `dit_graphs` is false); a capture that fails leaves that stage eager, with a
        warning."""
        audio = self._audio
        assert isinstance(audio, V3AudioStage)
        flow = audio.flow
        self._capture_each(((audio, "vocoder_graphs", "vocoder"),))
        if self.device.type == "cuda":
            self._make_flow_pages(flow)
        if flow.step_graphs is not None:
            flow.step_graphs.pages = flow.pages
        self._capture_each(((flow, "step_graphs", "flow"),))

    def _page_bytes(self, flow: CosyVoice3Flow) -> int:
        """One page: a chunk of the attention grid's keys and values at every layer, for one
        Euler step (9.0 MB in bf16 on the released model)."""
        return self._flow_frame_bytes(flow) // STEPS * flow.cfg.dit.static_chunk_size

    def _stream_pages(self, flow: CosyVoice3Flow) -> int:
        return STEPS * self._budget_chunks(flow.cfg.dit.static_chunk_size)

    def _flow_store(self, flow: CosyVoice3Flow, pages: int) -> FlowPages:
        return flow.flow_pages(pages)

    def _audio_flow(self) -> CosyVoice3Flow:
        audio = self._audio
        assert isinstance(audio, V3AudioStage)
        return audio.flow

    def _vocoder_noise(self, config: V3ModelConfig) -> HiFTNoise:
        """The released vocoder's fixed noise, as long as the longest utterance the KV pool
        allows (every speech token of `max_positions`: 2 mel frames each)."""
        frames = min(NOISE_FRAMES, config.flow.token_mel_ratio * self.max_positions)
        noise = HiFTNoise.released(config.flow, config.hift,
                                   frames * samples_per_frame(config.hift))
        return HiFTNoise(noise.sines.to(self.device))

    def _streams_that_fit(self, llm: CosyVoice3LM, flow: CosyVoice3Flow,
                          config: V3ModelConfig) -> int:
        """`DEFAULT_STREAMS` on this device, or fewer when their KV rows and flow states
        (`_flow_frame_bytes` per mel frame) would not fit."""
        return self._streams_in_memory(llm, self._flow_frame_bytes(flow),
                                       config.mel.sampling_rate // config.mel.hop_size,
                                       frame_quantum=flow.cfg.dit.static_chunk_size)

    @staticmethod
    def _flow_frame_bytes(flow: CosyVoice3Flow) -> int:
        """Bytes of flow state a stream keeps per mel frame: one frame of its per-step keys and
        values (1.8 MB in bf16 on the released model: 10 steps, 22 layers, keys and values,
        guided and unguided rows, 16 heads of 64)."""
        dit = flow.cfg.dit
        element = flow.input_embedding.weight.element_size()
        return STEPS * dit.depth * 2 * 2 * dit.heads * dit.dim_head * element
