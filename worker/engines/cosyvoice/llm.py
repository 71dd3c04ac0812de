"""The text-to-speech-token language model: a Qwen2 backbone with speech embedding and head.

Parameter names match the released `llm.pt` (`llm.model.model.*` is the backbone,
`llm_embedding`, `speech_embedding`, `llm_decoder`). Decoding many requests at once lives in
`batch_decode.BatchDecoder`; this module holds the weights and the input layout.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from worker.engines.cosyvoice.config import LLMConfig

SOS = 0
TASK = 1


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

    def logp(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, V] of the next speech token from hidden states [B, T, H]."""
        return self.llm_decoder(hidden[:, -1]).float().log_softmax(dim=-1)

    @torch.inference_mode()
    def teacher_forced(self, embeds: torch.Tensor, speech_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [1, T+1, V] at every speech position given the true tokens."""
        full = torch.cat([embeds, self.speech_embedding(speech_tokens.long())], dim=1)
        hidden = self.backbone(inputs_embeds=full, use_cache=False).last_hidden_state
        start = embeds.size(1) - 1
        return self.llm_decoder(hidden[:, start:]).float().log_softmax(dim=-1)
