"""Qwen2 decoding with a preallocated KV cache, on the weights of a transformers `Qwen2Model`.

The transformers path grows its cache by concatenation and rebuilds masks at every step, which
costs tens of milliseconds per token on a GPU (launch-bound). Here each request gets fixed-size
key/value buffers once; a step writes one position and attends over the filled prefix. Norms, MLPs
and rotary tables come from the transformers modules themselves, so the numbers are the same.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import Qwen2Model

_CAPTURE_LOCK = threading.Lock()


@dataclass
class StaticKV:
    """Per-request key/value buffers [B, kv_heads, capacity, head_dim] per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].size(2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticDecoder:
    def __init__(self, model: Qwen2Model) -> None:
        cfg = model.config
        self.model = model
        self.heads = cfg.num_attention_heads
        self.kv_heads: int = cfg.num_key_value_heads or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads

    def new_cache(self, batch: int, capacity: int) -> StaticKV:
        weight = self.model.embed_tokens.weight
        shape = (batch, self.kv_heads, capacity, int(self.head_dim))
        layers = len(self.model.layers)
        # Zeroed, not empty: masked slots still enter attention's product with the values, and
        # stale NaNs there would poison it.
        return StaticKV(
            keys=[torch.zeros(shape, device=weight.device, dtype=weight.dtype)
                  for _ in range(layers)],
            values=[torch.zeros(shape, device=weight.device, dtype=weight.dtype)
                    for _ in range(layers)],
        )

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm for inputs [B, T, H] appended to `cache`.

        T > 1 is only allowed on an empty cache (the prompt); afterwards one position per call.
        """
        b, t, _ = x.shape
        start = cache.length
        if t > 1 and start != 0:
            raise ValueError("multi-token input is only supported as the first call")
        if start + t > cache.capacity:
            raise ValueError(f"KV cache full ({cache.capacity} positions)")
        positions = torch.arange(start, start + t, device=x.device).unsqueeze(0).expand(b, -1)
        cos, sin = cast(Any, self.model.rotary_emb)(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        end = start + t
        for i, layer in enumerate(cast(list[Any], self.model.layers)):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end],
                is_causal=t > 1, enable_gqa=self.heads != self.kv_heads,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.length = end
        return cast(torch.Tensor, self.model.norm(x))

    @torch.inference_mode()
    def forward_at(self, x: torch.Tensor, position: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """One step [B, 1, H] at device-side `position` [B] (all equal), with fixed shapes.

        Attends over the whole buffer with a mask instead of slicing it, so the call has the same
        shapes at every step and can be captured in a CUDA graph. Does not advance `cache.length`.
        """
        b = x.size(0)
        cos, sin = cast(Any, self.model.rotary_emb)(x, position.view(b, 1))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        slots = torch.arange(cache.capacity, device=x.device)
        visible = slots.view(1, 1, 1, -1) <= position.view(b, 1, 1, 1)
        bias = torch.zeros(visible.shape, device=x.device, dtype=x.dtype)
        bias = bias.masked_fill(~visible, float("-inf"))
        index = position[:1]
        for i, layer in enumerate(cast(list[Any], self.model.layers)):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[i].index_copy_(2, index, k)
            cache.values[i].index_copy_(2, index, v)
            out = F.scaled_dot_product_attention(
                q, cache.keys[i], cache.values[i], attn_mask=bias,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, 1, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return cast(torch.Tensor, self.model.norm(x))


class GraphStep:
    """One request's decode step captured as a CUDA graph over its own KV cache.

    Replaying costs one launch instead of hundreds; the capture (a few tens of milliseconds) is
    paid once per request, after its prompt has been prefilled.
    """

    def __init__(self, decoder: StaticDecoder, cache: StaticKV, head: torch.nn.Module) -> None:
        weight = decoder.model.embed_tokens.weight
        hidden = weight.size(1)
        self.cache = cache
        self.x = torch.zeros(cache.keys[0].size(0), 1, hidden, device=weight.device,
                             dtype=weight.dtype)
        self.position = torch.full((cache.keys[0].size(0),), cache.length, device=weight.device,
                                   dtype=torch.long)
        stream = torch.cuda.Stream(device=weight.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(weight.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                head(decoder.forward_at(self.x, self.position, cache)[:, -1])
        torch.cuda.current_stream(weight.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local capture: other requests keep launching work from their own threads.
        with _CAPTURE_LOCK, torch.cuda.graph(self.graph, capture_error_mode="thread_local"), \
                torch.inference_mode():
            self.logits = head(decoder.forward_at(self.x, self.position, cache)[:, -1])

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"KV cache full ({self.cache.capacity} positions)")
        self.x.copy_(x)
        self.position.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return cast(torch.Tensor, self.logits)
