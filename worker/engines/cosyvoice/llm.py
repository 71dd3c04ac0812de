"""The text-to-speech-token language model: a Qwen2 backbone with speech embedding and head.

Parameter names match the released `llm.pt` (`llm.model.model.*` is the backbone,
`llm_embedding`, `speech_embedding`, `llm_decoder`). Decoding is split into `prefill` and `step`
so a scheduler can run one step for many requests at once; the KV cache belongs to the caller.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model
from transformers.cache_utils import DynamicCache

from worker.engines.cosyvoice.config import LLMConfig

SOS = 0
TASK = 1
# transformers renamed `past_key_values` to `cache` in its 5.2x releases; accept either.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else (
    "past_key_values"
)


@dataclass
class DecodeState:
    """One request's decoding state: its KV cache and the speech tokens emitted so far."""

    cache: Any
    tokens: list[int]


class SpeechLM(nn.Module):
    def __init__(self, cfg: LLMConfig, backbone_config: Qwen2Config) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = backbone_config.hidden_size
        self.backbone = Qwen2Model(backbone_config)
        self.llm_embedding = nn.Embedding(2, hidden)
        self.speech_embedding = nn.Embedding(cfg.speech_token_size + 3, hidden)
        self.llm_decoder = nn.Linear(hidden, cfg.speech_token_size + 3)

    @property
    def eos(self) -> int:
        return self.cfg.speech_token_size

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        emb: torch.Tensor = self.backbone.embed_tokens(ids)
        return emb

    def build_input(
        self, text_ids: torch.Tensor, prompt_speech_tokens: torch.Tensor
    ) -> torch.Tensor:
        """[1, L, H]: sos, text (prompt text first), task id, then the prompt's speech tokens."""
        text = self.embed_text(text_ids)
        sos = self.llm_embedding.weight[SOS].reshape(1, 1, -1)
        task = self.llm_embedding.weight[TASK].reshape(1, 1, -1)
        speech = self.speech_embedding(prompt_speech_tokens.long())
        return torch.cat([sos, text, task, speech.to(text.dtype)], dim=1)

    def _run(self, embeds: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.backbone(inputs_embeds=embeds, use_cache=True, **{_CACHE_ARG: cache})
        logits = self.llm_decoder(out.last_hidden_state[:, -1])
        return logits.float().log_softmax(dim=-1), getattr(out, _CACHE_ARG)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Log-probabilities [1, V] of the first speech token, and the state to continue from."""
        logp, cache = self._run(embeds, DynamicCache())
        return logp, DecodeState(cache=cache, tokens=[])

    @torch.inference_mode()
    def step(self, token: int, state: DecodeState) -> torch.Tensor:
        """Feed one emitted token; returns log-probabilities of the next."""
        ids = torch.tensor([[token]], device=self.llm_decoder.weight.device)
        logp, state.cache = self._run(self.speech_embedding(ids), state.cache)
        state.tokens.append(token)
        return logp

    @torch.inference_mode()
    def teacher_forced(self, embeds: torch.Tensor, speech_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [1, T+1, V] at every speech position given the true tokens."""
        full = torch.cat([embeds, self.speech_embedding(speech_tokens.long())], dim=1)
        hidden = self.backbone(inputs_embeds=full, use_cache=False).last_hidden_state
        start = embeds.size(1) - 1
        return self.llm_decoder(hidden[:, start:]).float().log_softmax(dim=-1)
