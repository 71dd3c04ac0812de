"""The CosyVoice3 flow estimator: a diffusion transformer (DiT) over mel frames.

Names follow the released `flow.pt` under `decoder.estimator.`: a sinusoidal time embedding and
MLP, an input projection of [noisy mel, prompt mel, token features, speaker] followed by a causal
convolutional position embedding (two grouped kernel-31 convolutions), `depth` blocks with
AdaLN-Zero modulation, rotary positions (applied, as in the released model, to the first
`dim_head` channels of the query and key projections only, pairs interleaved), and a modulated
output norm. Attention is bidirectional or, when streaming, chunk-causal: a frame sees every frame
before the end of its `static_chunk_size` chunk.

Every call works on new frames after earlier ones: `StepCache` carries, per row, where the
rotated keys and values of its earlier frames lie in a store of pages (each layer's keys are
block 2 * layer of it, its values block 2 * layer + 1: both are written and read in one copy
each way), where the call records the new frames', and the last input frames of both position
convolutions, and receives those of the new frames. A whole utterance is one call with no
store. Queries, keys and values are one product over stacked weights (`derived`). Rows are
padded on the right; padding never reaches a valid frame (convolutions look left, padded keys
are masked).
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.derived import stacked
from worker.engines.cosyvoice.flow_decoder import SinusoidalTime
from worker.engines.cosyvoice.flow_state import PagedFrames
from worker.engines.cosyvoice.v3_config import DiTConfig

POS_KERNEL = 31
POS_GROUPS = 16
TIME_FREQ_DIM = 256


@dataclass
class StepCache:
    """One estimator call's view of earlier frames, for a batch of rows.

    `past_len` [B]: earlier frames per row; `frames`: the store's pages of the rows' keys and
    values (`PagedFrames`, read as P earlier frames per row then the N new ones, P >= every
    past_len, P may be 0; entries beyond a row's past_len are masked), where every layer records
    its new frames' rotated keys and values before attending; None for a pass that keeps nothing
    (then no row has earlier frames). `tails`: per position convolution [B, dim, kernel-1], the
    input frames just before the new ones (zeros at the start). The call fills `new_tails`: each
    row's kernel-1 input frames before its first `commit` new frames (all its valid ones when
    `commit` is None), where the next call will continue.
    """

    past_len: torch.Tensor
    frames: PagedFrames | None
    tails: list[torch.Tensor]
    commit: torch.Tensor | None = None
    new_tails: list[torch.Tensor] = field(default_factory=list)


def _last_valid(full: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row b of `full` [B, C, keep + N]: columns lengths[b] .. lengths[b] + keep - 1."""
    index = lengths.view(-1, 1) + torch.arange(keep, device=full.device).view(1, -1)
    return torch.gather(full, 2, index.unsqueeze(1).expand(-1, full.size(1), -1))


class _TimeEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time_embed = SinusoidalTime(TIME_FREQ_DIM)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(self.time_embed(t).to(t.dtype))


class _CausalPositionConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, POS_KERNEL, groups=POS_GROUPS), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, POS_KERNEL, groups=POS_GROUPS), nn.Mish())

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D], continuing each row after `cache.tails`."""
        h = x.transpose(1, 2)
        for conv, tail in zip((self.conv1, self.conv2), cache.tails, strict=True):
            full = torch.cat([tail.to(h.dtype), h], dim=2)
            commit = lengths if cache.commit is None else cache.commit
            cache.new_tails.append(_last_valid(full, commit, POS_KERNEL - 1))
            h = conv(full)
        return h.transpose(1, 2)


class _InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim * 2 + cfg.mu_dim + cfg.spk_dim, cfg.dim)
        self.conv_pos_embed = _CausalPositionConv(cfg.dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self._weights, self._biases = stacked(), stacked()

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values of `h` [B, N, D] in one product: [B, N, 3, inner]."""
        weight = self._weights(self.to_q.weight, self.to_k.weight, self.to_v.weight)
        bias = self._biases(*(cast(torch.Tensor, m.bias) for m in (self.to_q, self.to_k,
                                                                   self.to_v)))
        out = F.linear(h, weight, bias)
        return out.view(*out.shape[:-1], 3, -1)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Dropout(0.0),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class _AdaNorm(nn.Module):
    def __init__(self, dim: int, parts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim * parts)


class _Rotary(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), eps=1e-6)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.attn_norm = _AdaNorm(cfg.dim, 6)
        self.attn = _Attention(cfg.dim, cfg.heads, cfg.dim_head)
        self.ff = _FeedForward(cfg.dim, cfg.ff_mult)

    def forward(
        self, x: torch.Tensor, silu_t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor, frames: PagedFrames | None, layer: int,
    ) -> torch.Tensor:
        """`silu_t` is SiLU of the time embedding (the same for every block), `rope` the
        rotation's cos and sin [B, N, 1, dim_head]."""
        mod = self.attn_norm.linear(silu_t).unsqueeze(1).chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod
        h = torch.addcmul(shift_a, _norm(x), 1 + scale_a)
        b, n, _ = x.shape
        cos, sin = rope
        rot = self.dim_head
        qkv = self.attn.project(h)
        # Only the first `rot` channels of queries and keys turn: rotated where they are, the
        # rest never copied.
        part = qkv[:, :, :2, :rot]
        qkv[:, :, :2, :rot] = (part * cos + _rotate_pairs(part) * sin).to(qkv.dtype)
        q, k, v = qkv.unbind(2)
        if frames is not None:
            # [keys / values, guided / unguided rows, R * N, inner], as the store lays them.
            new = qkv[:, :, 1:].view(2, b // 2 * n, 2, -1).permute(2, 0, 1, 3)
            k, v = (a.view(b, -1, a.size(-1)) for a in frames.keys_values(layer, new))
        q, k, v = (a.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for a in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1))
        x = torch.addcmul(x, gate_a, out)
        return torch.addcmul(x, gate_f, self.ff(torch.addcmul(shift_f, _norm(x), 1 + scale_f)))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.time_embed = _TimeEmbedding(cfg.dim)
        self.input_embed = _InputEmbedding(cfg)
        self.rotary_embed = _Rotary(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = _AdaNorm(cfg.dim, 2)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, N, 1, dim_head] of each frame's rotation (for queries and keys at
        once)."""
        # In float32 whatever the module's dtype: bfloat16 holds integers exactly only to 256.
        freqs = positions.float().unsqueeze(-1) * self.rotary_embed.inv_freq.float()
        freqs = freqs.repeat_interleave(2, dim=-1).unsqueeze(2)
        return freqs.cos(), freqs.sin()

    def _mask(
        self, cache: StepCache, lengths: torch.Tensor, past: int, n: int, streaming: bool
    ) -> torch.Tensor:
        """[B, 1, N, P + N] bool: which earlier and new frames each new frame attends to."""
        dev = lengths.device
        old = torch.arange(past, device=dev).view(1, 1, -1) < cache.past_len.view(-1, 1, 1)
        old = old.expand(-1, n, -1)
        new = torch.arange(n, device=dev).view(1, 1, -1) < lengths.view(-1, 1, 1)
        new = new.expand(-1, n, -1)
        if streaming:
            size = self.cfg.static_chunk_size
            query = cache.past_len.view(-1, 1) + torch.arange(n, device=dev).view(1, -1)
            end = (torch.div(query, size, rounding_mode="floor") + 1) * size
            key = cache.past_len.view(-1, 1) + torch.arange(n, device=dev).view(1, -1)
            new = new & (key.unsqueeze(1) < end.unsqueeze(2))
        return torch.cat([old, new], dim=2).unsqueeze(1)

    def forward(
        self, x: torch.Tensor, mu: torch.Tensor, cond: torch.Tensor, spks: torch.Tensor,
        t: torch.Tensor, lengths: torch.Tensor, cache: StepCache, streaming: bool,
    ) -> torch.Tensor:
        """Velocity [B, N, mel] for new frames x, mu, cond [B, N, mel], spks [B, spk_dim],
        times t [B]; `lengths` [B] valid new frames per row (each at least one)."""
        n = x.size(1)
        temb = self.time_embed(t)
        spk = spks.unsqueeze(1).expand(-1, n, -1)
        h = self.input_embed.proj(torch.cat([x, cond, mu, spk], dim=-1))
        h = self.input_embed.conv_pos_embed(h, lengths, cache) + h
        positions = cache.past_len.view(-1, 1) + torch.arange(n, device=x.device).view(1, -1)
        rope = self._rope(positions)
        frames = cache.frames
        past = 0 if frames is None else frames.read_slots.numel() * 2 // x.size(0) - n
        mask = self._mask(cache, lengths, past, n, streaming)
        silu_t = F.silu(temb)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, silu_t, rope, mask, frames, i)
        scale, shift = self.norm_out.linear(silu_t).unsqueeze(1).chunk(2, dim=-1)
        return self.proj_out(torch.addcmul(shift, _norm(h), 1 + scale))
