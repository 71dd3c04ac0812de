"""Qwen2 decoding over a slot pool of preallocated KV caches, on the weights of a `Qwen2Model`.

The transformers path grows its cache by concatenation and rebuilds masks at every step, which
costs tens of milliseconds per token on a GPU (launch-bound). Here the KV cache is one buffer per
layer holding `slots` rows of `positions` each; a request owns a row while it decodes. A prompt
is written into its row by `prefill`; `step` advances any set of rows by one position each, every
row at its own position, with fixed shapes, so a step over the first B rows can be captured once
as a CUDA graph and replayed for any requests that occupy them. The weights, norms' settings and
rotary tables are the transformers modules' own; fewer, larger kernels compute the same numbers:
each layer's query, key and value projections are one matrix product (as are the MLP's gate and
up projections), over one weight whose slices the original modules keep as views, so nothing is
stored twice; queries and keys are rotated together; norms are `F.rms_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers import Qwen2Model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """Qwen2's RMSNorm (in float32, scaled after the cast back) in one normalising kernel."""
    h = F.rms_norm(x.float(), (x.size(-1),), eps=norm.variance_epsilon)
    return cast(torch.Tensor, norm.weight * h.to(x.dtype))


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for projections of the same input, stacked by output; each module
    is left holding views of its own rows."""
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        biases = [m.bias for m in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else m.weight.new_zeros(m.out_features)
                              for m, b in zip(linears, biases, strict=True)])
        start = 0
        for m in linears:
            rows = slice(start, start + m.out_features)
            m.weight = nn.Parameter(weight[rows], requires_grad=False)
            if m.bias is not None and bias is not None:
                m.bias = nn.Parameter(bias[rows], requires_grad=False)
            start += m.out_features
    return weight, bias


@dataclass(frozen=True)
class _Layer:
    """A decoder layer's modules with its fused projections."""

    modules: Any
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None


class SlotPool:
    """Key/value buffers [slots, kv_heads, positions, head_dim] per layer."""

    def __init__(self, model: Qwen2Model, slots: int, positions: int) -> None:
        weight = model.embed_tokens.weight
        shape = (slots, *self.row_shape(model, positions))
        # Zeroed, not empty: masked slots still enter attention's product with the values, and
        # stale NaNs there would poison it.
        self.keys = [torch.zeros(shape, device=weight.device, dtype=weight.dtype)
                     for _ in model.layers]
        self.values = [torch.zeros(shape, device=weight.device, dtype=weight.dtype)
                       for _ in model.layers]

    @staticmethod
    def row_shape(model: Qwen2Model, positions: int) -> tuple[int, int, int]:
        """One slot's key (or value) buffer per layer: [kv_heads, positions, head_dim]."""
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = cfg.num_key_value_heads or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return kv_heads, positions, int(head_dim)

    @staticmethod
    def row_bytes(model: Qwen2Model, positions: int) -> int:
        """What one slot holds over every layer, keys and values."""
        kv_heads, positions, head_dim = SlotPool.row_shape(model, positions)
        element = model.embed_tokens.weight.element_size()
        return 2 * len(model.layers) * kv_heads * positions * head_dim * element

    @property
    def slots(self) -> int:
        return self.keys[0].size(0)

    @property
    def positions(self) -> int:
        return self.keys[0].size(2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class PoolDecoder:
    def __init__(self, model: Qwen2Model, pool: SlotPool) -> None:
        self.model = model
        self.pool = pool
        self.heads: int = model.config.num_attention_heads
        _, self.kv_heads, _, self.head_dim = pool.keys[0].shape
        self.layers: list[_Layer] = []
        for layer in cast(list[Any], model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv_weight, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up_weight, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(_Layer(layer, qkv_weight, qkv_bias, gate_up_weight, gate_up_bias))

    def _qkv(
        self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h = _rms_norm(layer.modules.input_layernorm, x)
        qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
        qkv = qkv.view(b, t, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        qk = qkv[:, : self.heads + self.kv_heads]
        qk = qk * cos + _rotate_half(qk) * sin
        return (qk[:, : self.heads], qk[:, self.heads :],
                qkv[:, self.heads + self.kv_heads :])

    def _finish(self, layer: _Layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        modules = layer.modules
        x = x + modules.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = _rms_norm(modules.post_attention_layernorm, x)
        gate, up = F.linear(h, layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
        return cast(torch.Tensor, x + modules.mlp.down_proj(modules.mlp.act_fn(gate) * up))

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Hidden states [1, T, H] after the final norm for a prompt [1, T, H] written into
        positions 0..T-1 of `slot` (whatever the slot held before is forgotten)."""
        return self.prefill_rows(x, [slot])

    @torch.inference_mode()
    def prefill_rows(self, x: torch.Tensor, slots: list[int] | torch.Tensor) -> torch.Tensor:
        """`prefill` for several prompts at once: x [B, T, H] right-padded, row i into
        `slots[i]`. Causal attention keeps each row's prompt positions from seeing its padding;
        the padding's keys and values land past the prompt, where decoding overwrites them
        before any step attends to them."""
        t = x.size(1)
        if t > self.pool.positions:
            raise ValueError(f"prompt of {t} positions exceeds the cache ({self.pool.positions})")
        positions = torch.arange(t, device=x.device).unsqueeze(0)
        cos, sin = cast(Any, self.model.rotary_emb)(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        index = torch.as_tensor(slots, device=x.device)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.pool.keys[i][index, :, :t] = k
            self.pool.values[i][index, :, :t] = v
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=t > 1, enable_gqa=self.heads != self.kv_heads
            )
            x = self._finish(layer, x, out)
        return _rms_norm(self.model.norm, x)

    @torch.inference_mode()
    def step(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One position for rows 0..B-1: inputs [B, 1, H] written at `positions` [B] (each row's
        own), attending over everything before it in its row. Returns hidden states [B, 1, H].

        Shapes depend on B only, and nothing reads back to the host: capturable in a graph.
        """
        b = x.size(0)
        cos, sin = cast(Any, self.model.rotary_emb)(x, positions.view(b, 1))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        slots = torch.arange(self.pool.positions, device=x.device)
        visible = slots.view(1, 1, 1, -1) <= positions.view(b, 1, 1, 1)
        bias = torch.zeros(visible.shape, device=x.device, dtype=x.dtype)
        bias = bias.masked_fill(~visible, float("-inf"))
        rows = torch.arange(b, device=x.device)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            keys, values = self.pool.keys[i][:b], self.pool.values[i][:b]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=bias, enable_gqa=self.heads != self.kv_heads
            )
            x = self._finish(layer, x, out)
        return _rms_norm(self.model.norm, x)
