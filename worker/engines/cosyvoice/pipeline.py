"""The three stages of synthesis and the per-request state that connects them.

`Stages` holds the loaded models and exposes one call per stage (an LLM step, the flow over a
chunk, the vocoder over a chunk); nothing in it remembers a request. `Utterance` is one request
piece's state: its inputs, the tokens so far, how far audio has been produced, and the vocoder's
overlap cache. Keeping the two apart is what lets requests share a GPU without sharing state.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from worker.engines.cosyvoice.flow import FlowModel
from worker.engines.cosyvoice.hift import HiFTGenerator, samples_per_frame
from worker.engines.cosyvoice.llm import SpeechLM
from worker.engines.cosyvoice.sampling import SamplingParams, sample_token

TOKEN_HOP = 25
MEL_CACHE_FRAMES = 8


@dataclass
class Utterance:
    """One piece of text to speak, with everything it needs and everything it has produced."""

    text_ids: list[int]
    tts_token_count: int
    llm_prompt_tokens: torch.Tensor
    flow_prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    embedding: torch.Tensor
    seed: int
    speed: float = 1.0
    tokens: list[int] = field(default_factory=list)
    offset: int = 0
    mel_cache: torch.Tensor | None = None
    source_cache: torch.Tensor | None = None
    speech_tail: torch.Tensor | None = None

    def first_hop(self) -> int:
        """Tokens in the first chunk: enough to align prompt + chunk on the model's chunk grid."""
        p = self.flow_prompt_tokens.size(1)
        return TOKEN_HOP + (math.ceil(p / TOKEN_HOP) * TOKEN_HOP - p)


class Stages:
    def __init__(
        self,
        llm: SpeechLM,
        flow: FlowModel,
        hift: HiFTGenerator,
        sampling: SamplingParams,
        device: torch.device,
        min_ratio: float = 2.0,
        max_ratio: float = 20.0,
        fixed_tokens: int | None = None,
    ) -> None:
        self.llm = llm
        self.flow = flow
        self.hift = hift
        self.sampling = sampling
        self.device = device
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio
        self.fixed_tokens = fixed_tokens
        self.lookahead = flow.cfg.pre_lookahead_len
        self.ratio = flow.cfg.token_mel_ratio
        self.source_cache_len = MEL_CACHE_FRAMES * samples_per_frame(hift.cfg)
        self.window = torch.from_numpy(np.hamming(2 * self.source_cache_len).astype(np.float32))

    def generate_tokens(
        self, utt: Utterance, emit: Callable[[int], None], stop: threading.Event
    ) -> None:
        """Run the LLM to the end of speech, calling `emit` per token; returns early on `stop`."""
        text = torch.tensor([utt.text_ids], dtype=torch.long, device=self.device)
        embeds = self.llm.build_input(text, utt.llm_prompt_tokens.to(self.device))
        min_len = int(utt.tts_token_count * self.min_ratio)
        max_len = int(utt.tts_token_count * self.max_ratio)
        if self.fixed_tokens is not None:
            min_len = max_len = self.fixed_tokens
        generator = torch.Generator().manual_seed(utt.seed)
        logp, state = self.llm.prefill(embeds, max_len)
        for i in range(max_len):
            if stop.is_set():
                return
            token = sample_token(
                logp, state.tokens, self.sampling, generator, allow_eos=i >= min_len,
                eos=self.llm.eos,
            )
            if token == self.llm.eos:
                return
            emit(token)
            if i + 1 < max_len:
                logp = self.llm.step(token, state)

    def ready(self, utt: Utterance, available: int) -> bool:
        """Whether `available` tokens are enough for the next streaming chunk."""
        hop = utt.first_hop() if utt.offset == 0 else TOKEN_HOP
        return available - utt.offset >= hop + self.lookahead

    def chunk(self, utt: Utterance, tokens: list[int], finalize: bool) -> np.ndarray:
        """Audio for the next chunk of `utt` (all remaining audio when `finalize`)."""
        if finalize:
            upto = len(tokens)
            hop = len(tokens) - utt.offset
        else:
            hop = utt.first_hop() if utt.offset == 0 else TOKEN_HOP
            upto = utt.offset + hop + self.lookahead
        token_tensor = torch.tensor([tokens[:upto]], dtype=torch.int32, device=self.device)
        mel = self.flow.mel(
            token_tensor,
            utt.flow_prompt_tokens.to(self.device),
            utt.prompt_mel.to(self.device),
            utt.embedding.to(self.device),
            finalize=finalize,
            streaming=not finalize,
        )
        mel = mel[:, :, utt.offset * self.ratio :]
        utt.offset += hop
        return self.vocode(utt, mel, finalize)

    @torch.inference_mode()
    def vocode(self, utt: Utterance, mel: torch.Tensor, finalize: bool) -> np.ndarray:
        """Vocoder over a mel chunk, cross-fading with the previous chunk's tail."""
        if utt.speed != 1.0:
            mel = F.interpolate(mel, size=max(1, int(mel.size(2) / utt.speed)), mode="linear")
        if utt.mel_cache is not None:
            mel = torch.cat([utt.mel_cache, mel], dim=2)
        generator = torch.Generator().manual_seed(utt.seed + utt.offset)
        speech, source = self.hift(mel, utt.source_cache, generator)
        speech = speech.float().cpu()
        if utt.speech_tail is not None:
            n = self.source_cache_len
            speech = speech.clone()
            speech[:, :n] = speech[:, :n] * self.window[:n] + utt.speech_tail * self.window[n:]
        if not finalize:
            utt.mel_cache = mel[:, :, -MEL_CACHE_FRAMES:]
            utt.source_cache = source[:, :, -self.source_cache_len :]
            utt.speech_tail = speech[:, -self.source_cache_len :]
            speech = speech[:, : -self.source_cache_len]
        return speech[0].numpy().astype(np.float32, copy=False)
