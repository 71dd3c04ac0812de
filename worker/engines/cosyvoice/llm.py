"""The text-to-speech-token language model: a Qwen2 backbone with speech embedding and head.

Parameter names match the released `llm.pt` (`llm.model.model.*` is the backbone,
`llm_embedding`, `speech_embedding`, `llm_decoder`). Decoding is split into `prefill` and `step`
so a scheduler can run one step for many requests at once; the KV cache belongs to the caller.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from worker.engines.cosyvoice.config import LLMConfig
from worker.engines.cosyvoice.decode import GraphStep, StaticDecoder, StaticKV

SOS = 0
TASK = 1


@dataclass
class DecodeState:
    """One request's decoding state: its KV cache and the speech tokens emitted so far."""

    cache: StaticKV
    tokens: list[int]
    decoder: StaticDecoder
    graph: GraphStep | None = None


class SpeechLM(nn.Module):
    def __init__(self, cfg: LLMConfig, backbone_config: Qwen2Config) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = backbone_config.hidden_size
        self.backbone = Qwen2Model(backbone_config)
        self.llm_embedding = nn.Embedding(2, hidden)
        self.speech_embedding = nn.Embedding(cfg.speech_token_size + 3, hidden)
        self.llm_decoder = nn.Linear(hidden, cfg.speech_token_size + 3)
        self.use_cuda_graph = True

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

    def _logp(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm_decoder(hidden[:, -1]).float().log_softmax(dim=-1)

    @torch.inference_mode()
    def prefill(
        self, embeds: torch.Tensor, max_new_tokens: int
    ) -> tuple[torch.Tensor, DecodeState]:
        """Log-probabilities [1, V] of the first speech token, and the state to continue from.

        The request's KV cache is allocated here, for the prompt plus `max_new_tokens`.
        """
        decoder = StaticDecoder(self.backbone)
        cache = decoder.new_cache(embeds.size(0), embeds.size(1) + max_new_tokens + 1)
        logp = self._logp(decoder.forward(embeds, cache))
        graph = None
        if self.use_cuda_graph and embeds.is_cuda:
            graph = GraphStep(decoder, cache, self.llm_decoder)
        return logp, DecodeState(cache=cache, tokens=[], decoder=decoder, graph=graph)

    @torch.inference_mode()
    def step(self, token: int, state: DecodeState) -> torch.Tensor:
        """Feed one emitted token; returns log-probabilities of the next."""
        ids = torch.tensor([[token]], device=self.llm_decoder.weight.device)
        state.tokens.append(token)
        if state.graph is not None:
            return state.graph(self.speech_embedding(ids)).float().log_softmax(dim=-1)
        return self._logp(state.decoder.forward(self.speech_embedding(ids), state.cache))

    @torch.inference_mode()
    def teacher_forced(self, embeds: torch.Tensor, speech_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [1, T+1, V] at every speech position given the true tokens."""
        full = torch.cat([embeds, self.speech_embedding(speech_tokens.long())], dim=1)
        hidden = self.backbone(inputs_embeds=full, use_cache=False).last_hidden_state
        start = embeds.size(1) - 1
        return self.llm_decoder(hidden[:, start:]).float().log_softmax(dim=-1)
