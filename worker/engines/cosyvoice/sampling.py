"""Repetition-aware sampling (RAS) of speech tokens for a whole batch, on the model's device.

Nucleus sampling (top-p within top-k); if the drawn token already appears in the recent window
often enough, draw again from the full distribution. End-of-speech is masked out below the
minimum length instead of being rejected by retries, so sampling can never loop.

Randomness is counter-based: each draw is a hash of (request seed, token index, draw), so a row's
tokens depend on its own seed and logits only, never on its neighbours in the batch or on the
order requests arrived. Everything here is tensor arithmetic with fixed shapes and no host sync,
so a decode step that ends in `sample` can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, counters: torch.Tensor, draw: int) -> torch.Tensor:
    """Uniform floats in [0, 1) [B], a pure function of each row's (seed, counter, draw)."""
    x = _mix32(seeds & _MASK32)
    x = _mix32(x ^ ((seeds >> 32) & _MASK32))
    x = _mix32(x ^ (counters & _MASK32))
    x = _mix32(x ^ (draw * 0x9E3779B9 & _MASK32))
    return (x >> 8).to(torch.float32) / float(1 << 24)


def _pick(cumulative: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each row's cumulative mass [B, N] that exceeds u * total."""
    target = u * cumulative[:, -1]
    index = (cumulative <= target.unsqueeze(1)).sum(dim=1)
    return index.clamp(max=cumulative.size(1) - 1)


def sample(
    logp: torch.Tensor,
    history: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    allow_eos: torch.Tensor,
    params: SamplingParams,
    eos: int,
) -> torch.Tensor:
    """Next tokens [B] (int64) from log-probabilities [B, V].

    `history` [B, W] holds each row's last W tokens (-1 where fewer), `seeds` and `counters` [B]
    int64 (the counter is the index of the token being drawn), `allow_eos` [B] bool. Ids above
    `eos` never come out.
    """
    logits = logp.float()
    vocab = torch.arange(logits.size(1), device=logits.device)
    blocked = (vocab > eos).unsqueeze(0) | ((vocab == eos).unsqueeze(0) & ~allow_eos.unsqueeze(1))
    probs = logits.masked_fill(blocked, -float("inf")).softmax(dim=-1)
    top, order = probs.topk(min(params.top_k, probs.size(1)), dim=-1)
    before = top.cumsum(dim=-1) - top
    kept = torch.where(before < params.top_p, top, torch.zeros_like(top))
    nucleus_token = order.gather(1, _pick(kept.cumsum(dim=-1), uniform(seeds, counters, 0))
                                 .unsqueeze(1)).squeeze(1)
    full_token = _pick(probs.cumsum(dim=-1), uniform(seeds, counters, 1))
    window = history[:, -params.win_size :]
    repeats = (window == nucleus_token.unsqueeze(1)).sum(dim=1)
    return torch.where(repeats >= params.win_size * params.tau_r, full_token, nucleus_token)
