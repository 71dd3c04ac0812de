"""The CosyVoice3 text-to-speech-token language model: a Qwen2 backbone, speech embedding and head.

Parameter names match the released `llm.pt`: `llm.model.model.*` is the backbone (loaded here as
`backbone.*`), `speech_embedding` has 6561 + 200 rows and `llm_decoder` is as wide, without bias.
Unlike CosyVoice2 there is no `llm_embedding`: start-of-sequence (6561) and the task id (6563)
are rows of the speech embedding, and any of the 200 ids past the codebook ends an utterance.
The backbone is a plain `Qwen2Model`, so `decode.PoolDecoder` drives it as it does CosyVoice2's.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from worker.engines.cosyvoice.config import LLMConfig, ModelDirError
from worker.engines.cosyvoice.v3_config import EXTRA_SPEECH_IDS
from worker.engines.cosyvoice.weights import llm_state, load_into, qwen_config, read_state

END_OF_PROMPT = 151646
"""`<|endofprompt|>` in the CosyVoice3 tokenizer: it must end the prompt part of the text."""

SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
"""Codebook entries that decode to silence or breath."""
MAX_SILENT_RUN = 5


class CosyVoice3LM(nn.Module):
    def __init__(
        self, cfg: LLMConfig, backbone_config: Qwen2Config, end_of_prompt: int = END_OF_PROMPT
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.end_of_prompt = end_of_prompt
        hidden = backbone_config.hidden_size
        rows = cfg.speech_token_size + EXTRA_SPEECH_IDS
        self.backbone = Qwen2Model(backbone_config)
        self.speech_embedding = nn.Embedding(rows, hidden)
        self.llm_decoder = nn.Linear(hidden, rows, bias=False)

    @property
    def sos(self) -> int:
        return self.cfg.speech_token_size

    @property
    def eos(self) -> int:
        """The column of `logp` that means "stop": every stop id merged into one. The released
        model ends speech with 6562, but upstream stops on any of the 200 ids past the codebook;
        merging them keeps that rule and lets the CosyVoice2 sampler (one end id, nothing
        above it) serve this model unchanged."""
        return self.cfg.speech_token_size

    @property
    def task_id(self) -> int:
        return self.cfg.speech_token_size + 2

    def is_stop(self, token: int) -> bool:
        """Any id past the codebook ends the utterance (upstream's 200 stop ids)."""
        return token >= self.cfg.speech_token_size

    def stop_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """[V] bool, true at every stop id: what a sampler blocks below the minimum length."""
        ids = torch.arange(self.llm_decoder.out_features, device=device)
        return ids >= self.cfg.speech_token_size

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(ids)

    def build_input(
        self, text_ids: torch.Tensor, prompt_speech_tokens: torch.Tensor
    ) -> torch.Tensor:
        """[1, L, H]: sos, text (prompt text first), task id, then the prompt's speech tokens.

        `text_ids` [1, N] must hold `<|endofprompt|>`: the released model was trained only on
        inputs that mark where the prompt (system text, instruction, transcript) ends.
        """
        if not bool((text_ids == self.end_of_prompt).any()):
            raise ValueError(
                f"CosyVoice3 text must contain <|endofprompt|> (id {self.end_of_prompt})")
        text = self.embed_text(text_ids)
        weight = self.speech_embedding.weight
        sos = weight[self.sos].reshape(1, 1, -1)
        task = weight[self.task_id].reshape(1, 1, -1)
        speech = self.speech_embedding(prompt_speech_tokens.long())
        return torch.cat([sos.to(text.dtype), text, task.to(text.dtype),
                          speech.to(text.dtype)], dim=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw logits [B, V] of the next speech token from hidden states [B, T, H]."""
        return self.llm_decoder(hidden[:, -1]).float()

    def logp(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, V + 1] of the next token from hidden states [B, T, H]: the
        codebook, then (column `eos`) the total probability of all stop ids."""
        full = self.logits(hidden).log_softmax(dim=-1)
        v = self.cfg.speech_token_size
        return torch.cat([full[:, :v], full[:, v:].logsumexp(dim=-1, keepdim=True)], dim=-1)

    @torch.inference_mode()
    def teacher_forced(self, embeds: torch.Tensor, speech_tokens: torch.Tensor) -> torch.Tensor:
        """Logits [1, T+1, V] at every speech position given the true tokens [1, T]."""
        full = torch.cat([embeds, self.speech_embedding(speech_tokens.long())], dim=1)
        hidden = self.backbone(inputs_embeds=full, use_cache=False).last_hidden_state
        start = embeds.size(1) - 1
        return self.llm_decoder(hidden[:, start:]).float()


def filter_silent(
    tokens: Iterable[int], run: int = 0, max_run: int = MAX_SILENT_RUN
) -> tuple[list[int], int]:
    """Drop silent tokens beyond `max_run` in a row; returns the kept tokens and the run length
    to pass with the next piece, so a stream can be filtered token by token.

    Only what goes to the flow is filtered: the LLM itself is fed every token it sampled.
    """
    kept: list[int] = []
    for token in tokens:
        if token in SILENT_TOKENS:
            run += 1
            if run > max_run:
                continue
        else:
            run = 0
        kept.append(token)
    return kept, run


def load_v3_llm(
    model_dir: Path, cfg: LLMConfig, end_of_prompt: int = END_OF_PROMPT
) -> CosyVoice3LM:
    """The model of `model_dir/llm.pt` (CPU, float32, eval mode). `end_of_prompt` is the id the
    text tokenizer gives `<|endofprompt|>` (151646 for the released tokenizer once the
    CosyVoice3 special tokens are added)."""
    model = CosyVoice3LM(cfg, qwen_config(model_dir), end_of_prompt)
    path = model_dir / "llm.pt"
    state = llm_state(read_state(path))
    if "llm_embedding.weight" in state:
        raise ModelDirError(f"{path} holds a CosyVoice2 LLM (it has llm_embedding).")
    load_into(model, state, path)
    return model.eval()
