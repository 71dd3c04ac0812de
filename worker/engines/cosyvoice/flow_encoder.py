"""The flow's token encoder: a chunk-causal conformer that upsamples tokens 2x to mel frames.

Module and parameter names follow the released `flow.pt` (prefix `encoder.`), so its tensors load
by name. Every function takes a batch: tensors are [B, T, C] with a [B, T] validity mask.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import EncoderConfig


def chunk_mask(size: int, chunk: int, device: torch.device) -> torch.Tensor:
    """[T, T] boolean mask where frame i sees every frame of its own and earlier chunks."""
    pos = torch.arange(size, device=device)
    if chunk <= 0:
        return torch.ones(size, size, dtype=torch.bool, device=device)
    limit = (torch.div(pos, chunk, rounding_mode="trunc") + 1) * chunk
    return pos.unsqueeze(0) < limit.unsqueeze(1)


def attention_mask(
    valid: torch.Tensor, chunk: int, streaming: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T, T] mask from a [B, T] validity mask, a chunk size and, per row, whether the row is
    streamed (chunk-causal attention) or not (full context). Without `streaming`, every row is.

    A row with nothing to see (a padded frame) is opened fully so softmax stays finite; its output
    is masked away later.
    """
    size = valid.size(1)
    mask = valid.unsqueeze(1).expand(-1, size, -1)
    if chunk > 0:
        causal = chunk_mask(size, chunk, valid.device).unsqueeze(0)
        if streaming is not None:
            causal = causal | ~streaming.view(-1, 1, 1)
        mask = mask & causal
    empty = mask.sum(dim=-1) == 0
    return mask | empty.unsqueeze(-1)


class RelPositionalEncoding(nn.Module):
    """Sinusoidal relative positions (ESPnet layout): scales x, returns [1, 2T-1, D] encodings."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)

    def encodings(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        position = torch.arange(0, size, dtype=torch.float32, device=device).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
            * -(math.log(10000.0) / self.d_model)
        )
        pos = torch.zeros(size, self.d_model, device=device)
        neg = torch.zeros(size, self.d_model, device=device)
        pos[:, 0::2] = torch.sin(position * div_term)
        pos[:, 1::2] = torch.cos(position * div_term)
        neg[:, 0::2] = torch.sin(-1 * position * div_term)
        neg[:, 1::2] = torch.cos(-1 * position * div_term)
        table = torch.cat([torch.flip(pos, [0]), neg[1:]], dim=0).unsqueeze(0)
        return table.to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.xscale, self.encodings(x.size(1), x.device, x.dtype)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm input layer with relative position encodings (`embed.out.0/1`)."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.pos_enc = RelPositionalEncoding(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions and learned biases.

    The position term is an additive bias of scaled-dot-product attention, read through a
    strided view of the [T, 2T - 1] product (the relative shift, without a copy), so a layer
    holds one [B, H, T, T] tensor, not five: at 32 rows of 1,024 frames each was 0.5 GB
    (1 GB before the shift), and a CUDA graph's pool keeps the largest working set it saw.
    """

    def __init__(self, n_head: int, n_feat: int) -> None:
        super().__init__()
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    @staticmethod
    def _rel_shift(x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, 2T - 1] scores over relative positions (T - 1 down to 1 - T) as the view
        [B, H, T, T] over key positions: entry (i, j) is x[..., i, T - 1 - i + j]."""
        b, h, t, t2 = x.shape
        return x.as_strided((b, h, t, t), (x.stride(0), x.stride(1), t2 - 1, 1),
                            x.storage_offset() + t - 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """`mask` [B, T, T]: which keys each frame sees (every frame sees at least one)."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        scale = 1 / math.sqrt(self.d_k)
        bd = torch.matmul(((q + self.pos_bias_v) * scale).transpose(1, 2), p.transpose(-2, -1))
        position_bias = self._rel_shift(bd).masked_fill(~mask.unsqueeze(1), -float("inf"))
        out = F.scaled_dot_product_attention((q + self.pos_bias_u).transpose(1, 2), k, v,
                                             attn_mask=position_bias)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, self.h * self.d_k))


class FeedForward(nn.Module):
    def __init__(self, idim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm attention + feed-forward block (the released model has no macaron or conv)."""

    def __init__(self, size: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(heads, size)
        self.feed_forward = FeedForward(size, hidden)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """Mixes each token with the next `lookahead` tokens; `context` supplies them mid-stream."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [B, N + lookahead, C]: each row's frames followed by its look-ahead context (or
        zeros where the row has none, as at the end of an utterance); returns [B, N, C]."""
        y = F.leaky_relu(self.conv1(x.transpose(1, 2)))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x[:, : y.size(2)]


class Upsample(nn.Module):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x.transpose(1, 2), scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(y, (self.stride * 2, 0))).transpose(1, 2)


class UpsampleEncoder(nn.Module):
    """Tokens [B, T, 512] -> features [B, 2T, 512]; `streaming` applies chunk-causal masks."""

    def __init__(self, cfg: EncoderConfig, lookahead: int) -> None:
        super().__init__()
        self.cfg = cfg
        size = cfg.output_size
        self.embed = LinearEmbed(cfg.input_size, size)
        self.pre_lookahead_layer = PreLookahead(size, lookahead)
        self.encoders = nn.ModuleList(
            ConformerLayer(size, cfg.attention_heads, cfg.linear_units)
            for _ in range(cfg.num_blocks)
        )
        self.up_layer = Upsample(size, cfg.upsample_stride)
        self.up_embed = LinearEmbed(cfg.input_size, size)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(size, cfg.attention_heads, cfg.linear_units)
            for _ in range(cfg.num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(size, eps=1e-5)

    def forward(
        self, xs: torch.Tensor, present: torch.Tensor, valid: torch.Tensor,
        streaming: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, 2N, C] and their [B, 2N] validity mask.

        `xs` [B, N + lookahead, C] holds each row's token embeddings, then the row's look-ahead
        tokens; `present` [B, N + lookahead] marks the positions that hold a token (the rest count
        as zeros, as after the end of an utterance); `valid` [B, N] marks the frames that produce
        output; `streaming` [B] chooses chunk-causal attention per row.
        """
        chunk = self.cfg.static_chunk_size
        xs, _ = self.embed(xs)
        pos = self.embed.pos_enc.encodings(valid.size(1), xs.device, xs.dtype)
        xs = self.pre_lookahead_layer(xs * present.unsqueeze(-1).to(xs.dtype))
        mask = attention_mask(valid, chunk, streaming)
        for layer in self.encoders:
            xs = layer(xs, mask, pos)
        xs = self.up_layer(xs)
        up_valid = valid.repeat_interleave(self.cfg.upsample_stride, dim=1)
        xs, pos = self.up_embed(xs)
        mask = attention_mask(up_valid, chunk * self.cfg.upsample_stride, streaming)
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos)
        return self.after_norm(xs), up_valid
