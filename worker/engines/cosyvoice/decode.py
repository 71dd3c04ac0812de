"""Qwen2 decoding over a slot pool of preallocated KV caches, on the weights of a `Qwen2Model`.

The transformers path grows its cache by concatenation and rebuilds masks at every step, which
costs tens of milliseconds per token on a GPU (launch-bound). Here the KV cache is one buffer per
layer holding `slots` rows of `positions` each; a request owns a row while it decodes. A prompt
is written into its row by `prefill`; `step` advances any set of rows by one position each, every
row at its own position, with fixed shapes, so a step over the first B rows can be captured once
as a CUDA graph and replayed for any requests that occupy them. Norms, MLPs and rotary tables
come from the transformers modules themselves, so the numbers are the same.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import Qwen2Model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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

    def _qkv(
        self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _finish(self, layer: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return cast(torch.Tensor, x + layer.mlp(layer.post_attention_layernorm(x)))

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Hidden states [1, T, H] after the final norm for a prompt [1, T, H] written into
        positions 0..T-1 of `slot` (whatever the slot held before is forgotten)."""
        return self.prefill_rows(x, [slot])

    @torch.inference_mode()
    def prefill_rows(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
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
        index = torch.tensor(slots, device=x.device)
        for i, layer in enumerate(cast(list[Any], self.model.layers)):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.pool.keys[i][index, :, :t] = k
            self.pool.values[i][index, :, :t] = v
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=t > 1, enable_gqa=self.heads != self.kv_heads
            )
            x = self._finish(layer, x, out)
        return cast(torch.Tensor, self.model.norm(x))

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
        for i, layer in enumerate(cast(list[Any], self.model.layers)):
            q, k, v = self._qkv(layer, x, cos, sin)
            keys, values = self.pool.keys[i][:b], self.pool.values[i][:b]
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=bias, enable_gqa=self.heads != self.kv_heads
            )
            x = self._finish(layer, x, out)
        return cast(torch.Tensor, self.model.norm(x))
