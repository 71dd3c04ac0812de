"""The flow-matching estimator (a causal 1-D U-Net with transformer blocks) and its Euler solver.

Names follow the released `flow.pt` under `decoder.estimator.`. The solver is batch-shaped: the
guided and unguided passes of every request run as one estimator call of batch 2B.

Inside the estimator every tensor is [B, T, C] (channels last), the layout its transformer
blocks and layer norms want: the causal convolutions are one matrix product over each frame and
the two before it (a strided view of the padded input, copied once), so nothing is transposed
between blocks. In [B, C, T], each block's norm and cuDNN's convolutions transposed their input
and output, some 18% of an Euler step on an H100. Products that share an input are one product
over stacked weights (`derived`): an attention block's keys and values, and every resnet's
projection of the time embedding.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import EstimatorConfig
from worker.engines.cosyvoice.derived import Derived, stacked
from worker.engines.cosyvoice.flow_state import SolverHistory, StepHistory


class SinusoidalTime(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(
            torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1))
        )
        emb = scale * t.unsqueeze(1) * freq.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class CausalConv1d(nn.Conv1d):
    """Kernel-3 convolution over [B, T, C] that sees only the present and the two frames before.

    With a history, those two frames come from the history's tail instead of zero padding, and
    the two input frames before the end of each row's kept frames are recorded for its next
    chunk.
    """

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__(cin, cout, kernel)
        assert kernel == 3, "histories keep two frames"
        self.index = 0
        """Position among the estimator's causal convolutions (set by the estimator)."""
        self._by_frames = Derived(lambda w: w.permute(0, 2, 1).reshape(w.size(0), -1))
        """The weight as [C_out, 3 * C_in], frame by frame (oldest first)."""

    def forward(self, x: torch.Tensor, history: StepHistory | None = None) -> torch.Tensor:
        rows, frames, channels = x.shape
        if history is None:
            x = F.pad(x, (0, 0, 2, 0))
        else:
            tail = history.tails[self.index, :, :, :channels].reshape(rows, channels, 2)
            x = torch.cat([tail.transpose(1, 2), x], dim=1)
            last = x.gather(1, history.tail_index.transpose(1, 2).expand(-1, -1, channels))
            history.tails_out[self.index, :, :, :channels].copy_(
                last.transpose(1, 2).view(2, -1, channels, 2))
        # Each frame beside the two before it: [B, T, 3 * C] as a view of [B, T + 2, C].
        windows = x.as_strided((rows, frames, 3 * channels), (x.stride(0), channels, 1))
        out = torch.addmm(cast(torch.Tensor, self.bias), windows.reshape(-1, 3 * channels),
                          self._by_frames(self.weight).t())
        return out.view(rows, frames, -1)


def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-1 convolution over [B, T, C]."""
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


class CausalBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        # Indices 0 and 2 hold the weights, as in the released checkpoint.
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out), nn.Identity(),
            nn.Mish(),
        )

    def forward(self, masked: torch.Tensor, mask: torch.Tensor,
                history: StepHistory | None = None) -> torch.Tensor:
        """The block over `masked`, its input already multiplied by `mask`."""
        conv, _, norm, _, act = self.block
        return act(norm(conv(masked, history))) * mask


class CausalResnet(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        """The time embedding's projection: the estimator runs every resnet's as one product
        (`Estimator.time_shifts`)."""
        self.block1 = CausalBlock(dim, dim_out)
        self.block2 = CausalBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_shift: torch.Tensor,
                history: StepHistory | None = None) -> torch.Tensor:
        """`time_shift` [B, 1, C_out] is `mlp` of the time embedding."""
        masked = x * mask
        h = self.block1(masked, mask, history) + time_shift
        return self.block2(h * mask, mask, history) + _pointwise(self.res_conv, masked)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self._keys_values = stacked()

    def forward(self, x: torch.Tensor, bias: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of x [B, T, C]; with `context` [B, K, C] (the earlier frames'
        inputs, then x's), the keys and values are projected from the context (both in one
        product)."""
        b, t, _ = x.shape
        q = self.to_q(x)
        weight = self._keys_values(self.to_k.weight, self.to_v.weight)
        k, v = F.linear(x if context is None else context, weight).chunk(2, dim=-1)
        q, k, v = (y.view(b, -1, self.heads, y.size(-1) // self.heads).transpose(1, 2)
                   for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(1))
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GeluProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.index = 0
        """Position among the estimator's transformer blocks (set by the estimator)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor,
                history: StepHistory | None = None) -> torch.Tensor:
        h = self.norm1(x)
        context = None if history is None else history.keys(self.index, h)
        x = x + self.attn1(h, bias, context)
        return x + self.ff(self.norm3(x))


class Estimator(nn.Module):
    """Predicts the flow velocity for x [B, 80, T] given mu, speaker, prompt mel and time t [B]."""

    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels[0]
        time_dim = ch * 4
        self.time_embeddings = SinusoidalTime(cfg.in_channels)
        self.time_mlp = TimestepMLP(cfg.in_channels, time_dim)

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(ch, cfg.num_heads, cfg.attention_head_dim)
                for _ in range(cfg.n_blocks)
            )

        self.down_blocks = nn.ModuleList(
            [nn.ModuleList([CausalResnet(cfg.in_channels, ch, time_dim), blocks(),
                            CausalConv1d(ch, ch, 3)])]
        )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnet(ch, ch, time_dim), blocks()])
            for _ in range(cfg.num_mid_blocks)
        )
        self.up_blocks = nn.ModuleList(
            [nn.ModuleList([CausalResnet(2 * ch, ch, time_dim), blocks(), CausalConv1d(ch, ch, 3)])]
        )
        self.final_block = CausalBlock(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.out_channels, 1)
        for kind in (TransformerBlock, CausalConv1d):
            for i, module in enumerate(m for m in self.modules() if isinstance(m, kind)):
                module.index = i
        self._resnets = [m for m in self.modules() if isinstance(m, CausalResnet)]
        self._time_weights, self._time_biases = stacked(), stacked()

    @property
    def attention_blocks(self) -> int:
        return sum(isinstance(m, TransformerBlock) for m in self.modules())

    @property
    def convolutions(self) -> list[int]:
        """Input channels of each causal convolution, in order."""
        return [m.in_channels for m in self.modules() if isinstance(m, CausalConv1d)]

    def time_shifts(self, temb: torch.Tensor) -> list[torch.Tensor]:
        """Every resnet's `mlp` of the time embedding [B, T_dim], in one product: [B, 1, C]
        each, in the resnets' order."""
        linears = [cast(nn.Linear, r.mlp[1]) for r in self._resnets]
        weight = self._time_weights(*(m.weight for m in linears))
        bias = self._time_biases(*(cast(torch.Tensor, m.bias) for m in linears))
        shifts = F.linear(F.mish(temb), weight, bias).unsqueeze(1)
        return list(torch.split(shifts, [m.out_features for m in linears], dim=-1))

    @staticmethod
    def _attend(
        x: torch.Tensor, blocks: nn.ModuleList, bias: torch.Tensor, history: StepHistory | None,
    ) -> torch.Tensor:
        for block in blocks:
            x = block(x, bias, history)
        return x

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        bias: torch.Tensor,
        history: StepHistory | None = None,
    ) -> torch.Tensor:
        """`bias` [B, T, K] is the additive attention mask over the K keys (the history's frames,
        then x's); `history` carries the earlier frames of a chunk-by-chunk utterance. Inputs and
        output are [B, C, T]."""
        shifts = iter(self.time_shifts(self.time_mlp(self.time_embeddings(t).to(t.dtype))))
        spk = spks.unsqueeze(-1).expand(-1, -1, x.size(-1))
        h = torch.cat([y.transpose(1, 2) for y in (x, mu, spk, cond)], dim=2)
        mask = mask.transpose(1, 2)
        resnet, blocks, down = cast(Any, self.down_blocks[0])
        h = resnet(h, mask, next(shifts), history)
        skip = self._attend(h, blocks, bias, history)
        h = down(skip * mask, history)
        for resnet, blocks in cast(Any, self.mid_blocks):
            h = self._attend(resnet(h, mask, next(shifts), history), blocks, bias, history)
        resnet, blocks, up = cast(Any, self.up_blocks[0])
        h = resnet(torch.cat([h[:, : skip.size(1)], skip], dim=2), mask, next(shifts), history)
        h = up(self._attend(h, blocks, bias, history) * mask, history)
        h = self.final_block(h * mask, mask, history)
        return (_pointwise(self.final_proj, h) * mask).transpose(1, 2)  # h is masked


class EulerSolver:
    """Fixed-step Euler integration with classifier-free guidance, batch-shaped.

    `noise` is the starting point [B, 80, T]; the caller owns it so streaming and parity can use
    the same fixed noise the released model was tuned with.
    """

    def __init__(self, estimator: Estimator, cfg_rate: float, scheduler: str) -> None:
        self.estimator = estimator
        self.cfg_rate = cfg_rate
        self.scheduler = scheduler

    def time_span(self, steps: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        span = torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)
        if self.scheduler == "cosine":
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        return span

    def solve(
        self,
        noise: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        bias: torch.Tensor,
        steps: int = 10,
        history: SolverHistory | None = None,
    ) -> torch.Tensor:
        """Mel [B, 80, T] from `noise` [B, 80, T]; `bias` [B, T, K] masks attention per row.

        With a `history`, x holds only each row's new frames, and every step reads the earlier
        frames from the history and records the new ones in it.
        """
        b = noise.size(0)
        span = self.time_span(steps, noise.device, noise.dtype)
        x = noise
        mask2 = torch.cat([mask, mask], dim=0)
        mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks2 = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond2 = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        bias2 = torch.cat([bias, bias], dim=0)
        t = span[0]
        dt = span[1] - span[0]
        for step in range(1, steps + 1):
            v = self.estimator(
                torch.cat([x, x], dim=0), mask2, mu2, t.expand(2 * b), spks2, cond2, bias2,
                None if history is None else history.step(step - 1),
            )
            guided, free = v[:b], v[b:]
            x = x + dt * ((1.0 + self.cfg_rate) * guided - self.cfg_rate * free)
            t = t + dt
            if step < steps:
                dt = span[step + 1] - t
        return x.float()
