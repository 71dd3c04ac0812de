"""Repetition-aware sampling (RAS) of speech tokens, seeded per request.

Nucleus sampling (top-p within top-k); if the drawn token already appears in the recent window
often enough, draw again from the full distribution. End-of-speech is masked out below the
minimum length instead of being rejected by retries, so sampling can never loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


def nucleus(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Probabilities [B, V] restricted to the top-p nucleus within the top-k, renormalised."""
    values, order = probs.sort(dim=-1, descending=True, stable=True)
    before = values.cumsum(dim=-1) - values
    rank = torch.arange(values.size(-1), device=probs.device).unsqueeze(0)
    keep = (before < top_p) & (rank < top_k)
    kept = torch.where(keep, values, torch.zeros_like(values))
    out = torch.zeros_like(probs).scatter(-1, order, kept)
    return out / out.sum(dim=-1, keepdim=True)


def sample_token(
    logp: torch.Tensor,
    history: list[int],
    params: SamplingParams,
    generator: torch.Generator,
    allow_eos: bool,
    eos: int,
) -> int:
    """One speech token (or `eos`) from log-probabilities [1, V]; ids above `eos` never come out."""
    logits = logp.detach().float().cpu().clone()
    logits[:, eos + 1 :] = -float("inf")
    if not allow_eos:
        logits[:, eos] = -float("inf")
    probs = logits.softmax(dim=-1)
    token = int(torch.multinomial(nucleus(probs, params.top_p, params.top_k), 1,
                                  generator=generator).item())
    window = history[-params.win_size :]
    if window.count(token) >= params.win_size * params.tau_r:
        token = int(torch.multinomial(probs, 1, generator=generator).item())
    return token
