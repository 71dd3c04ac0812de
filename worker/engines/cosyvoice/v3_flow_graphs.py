"""CosyVoice3's streamed DiT estimator replayed from CUDA graphs, one Euler step per replay.

Eagerly, one estimator call is about 700 small kernels (22 blocks), and a chunk makes ten of
them: at small batches the host launching them is the cost, not the GPU. A bucket holds static
inputs for `rows` requests of up to `frames` new frames after up to `past` earlier ones, guided
rows first and unguided ones `rows` later, as the solver stacks them; a step copies the rows'
inputs and their earlier keys and values for that step in (padding rows have one valid frame and
no past, so attention stays finite; their output is dropped) and replays the graph, which fills
the new frames' velocity, keys, values and convolution tails.

The graph is per step, not per chunk: the earlier keys and values of one step are a tenth of a
request's state (1.8 MB per frame for all ten steps, released model, bf16), so a bucket's buffer
is 64 rows x 906 frames x 0.18 MB = 10.4 GB at the largest size (the engine's rows are powers of
two up to its `max_audio_rows`) instead of ten times that. The buffers of the earlier frames are
shared by every bucket, as views of one allocation: replays never overlap, and each step's
outputs are copied into the requests' states before the next. Nothing is captured while serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worker.engines.cosyvoice.graphs import capture_all, replay, usable
from worker.engines.cosyvoice.v3_dit import POS_KERNEL, DiT, StepCache

if TYPE_CHECKING:
    from worker.engines.cosyvoice.v3_flow import FlowStream


@dataclass
class DiTStep:
    """A step's outputs for the rows of a call: velocity [2R, N, mel], the new frames' keys and
    values [layers, 2 (k, v), 2 (guided, unguided), R, heads, N, dim_head] (a view of the shared
    buffer, which the graph writes: no bucket holds memory of its own for them), and both
    position convolutions' tails [2R, dim, 30]."""

    velocity: torch.Tensor
    kv: torch.Tensor
    tails: list[torch.Tensor]


@dataclass
class _Bucket:
    rows: int
    frames: int
    past: int
    x: torch.Tensor
    mu: torch.Tensor
    cond: torch.Tensor
    spks: torch.Tensor
    t: torch.Tensor
    lengths: torch.Tensor
    past_len: torch.Tensor
    commit: torch.Tensor
    past_kv: torch.Tensor
    """[layers, 2 (keys, values), 2 (guided, unguided), rows, heads, past + frames, dim_head]:
    the earlier frames' keys and values, then room for the new frames'."""
    tails: torch.Tensor
    """[2 convolutions, 2 (guided, unguided), rows, dim, kernel - 1]."""
    output: DiTStep | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DiTStepGraphs:
    """Graphs of one estimator step for batches of `rows` sizes: first chunks (no earlier
    frames, up to `first_frames` new ones in `frame_step` steps), later chunks (each of the
    `later_frames` widths, for chunks of one hop or two, after up to `max_past` earlier frames)
    and first chunks after a prompt's prefix (those widths, or up to `prefixed_frames` new frames
    in `frame_step` steps, after up to `max_prefix` earlier ones)."""

    def __init__(
        self, estimator: DiT, device: torch.device, dtype: torch.dtype,
        rows: tuple[int, ...] = (1, 2, 4, 8, 16), frame_step: int = 100,
        first_frames: int = 500, later_frames: tuple[int, ...] = (56, 106), max_past: int = 800,
        prefixed_frames: int = 300, max_prefix: int = 300,
    ) -> None:
        self.estimator = estimator
        self.rows = tuple(sorted(rows))
        self.frame_step = frame_step
        self.later_frames = tuple(sorted(later_frames))
        cfg = estimator.cfg
        layers, heads, dim_head = cfg.depth, cfg.heads, cfg.dim_head
        sizes = [(r, f, 0) for r in self.rows
                 for f in range(frame_step, first_frames + 1, frame_step)]
        sizes += [(r, f, p) for r in self.rows for f in self.later_frames
                  for p in range(frame_step, max_past + 1, frame_step)]
        sizes += [(r, f, p) for r in self.rows
                  for f in range(frame_step, prefixed_frames + 1, frame_step)
                  if f > self.later_frames[-1]
                  for p in range(frame_step, max_prefix + 1, frame_step)]
        widest = max(r * (p + f) for r, f, p in sizes)
        past_kv = torch.zeros(layers * 2 * 2 * widest * heads * dim_head, device=device,
                              dtype=dtype)

        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=kind)

        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        for r, f, p in sizes:
            b = 2 * r
            self._buckets[(r, f, p)] = _Bucket(
                rows=r, frames=f, past=p, x=zeros(b, f, cfg.mel_dim), mu=zeros(b, f, cfg.mu_dim),
                cond=zeros(b, f, cfg.mel_dim), spks=zeros(b, cfg.spk_dim), t=zeros(b),
                lengths=torch.ones(b, dtype=torch.long, device=device),
                past_len=zeros(b, kind=torch.long),
                commit=torch.ones(b, dtype=torch.long, device=device),
                past_kv=past_kv[: layers * 2 * b * heads * (p + f) * dim_head].view(
                    layers, 2, 2, r, heads, p + f, dim_head),
                tails=zeros(2, 2, r, cfg.dim, POS_KERNEL - 1),
            )

    def _run(self, bucket: _Bucket) -> DiTStep:
        kv = bucket.past_kv.flatten(2, 3)  # [layers, 2, 2R, heads, past + frames, dim_head]
        tails = bucket.tails.flatten(1, 2)
        cache = StepCache(bucket.past_len, list(kv[:, 0]), list(kv[:, 1]), [tails[0], tails[1]],
                          bucket.commit)
        velocity = self.estimator(bucket.x, bucket.mu, bucket.cond, bucket.spks, bucket.t,
                                  bucket.lengths, cache, True)
        return DiTStep(velocity, bucket.past_kv[..., bucket.past:, :], cache.new_tails)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graph (CUDA only)."""
        device = next(iter(self._buckets.values())).x.device
        capture_all(self._buckets.values(), self._run, device)

    def bucket_for(self, rows: int, frames: int, past: int) -> _Bucket | None:
        step = self.frame_step
        p = -(-past // step) * step
        r = next((r for r in self.rows if r >= rows), None)
        later = next((w for w in self.later_frames if w >= frames), None) if p > 0 else None
        f = later or -(-frames // step) * step
        return self._buckets.get((r, f, p)) if r is not None else None

    def usable_bucket(self, rows: int, frames: int, past: int, on_cuda: bool
                      ) -> _Bucket | None:
        """The bucket a call of this shape replays, or None (it runs eagerly)."""
        return usable(self.bucket_for(rows, frames, past), on_cuda)

    @torch.inference_mode()
    def step(
        self, bucket: _Bucket, streams: list[FlowStream], step: int, x: torch.Tensor,
        mu: torch.Tensor, cond: torch.Tensor, spks: torch.Tensor, t: torch.Tensor,
        lengths: torch.Tensor, commit: torch.Tensor,
    ) -> DiTStep:
        """Euler step `step` of the estimator for a call's streams: `x`, `mu`, `cond`
        [B, N, mel] and `spks` [B, spk] of the guided rows (the unguided ones get zeros for all
        but `x`), `t` the time, `lengths` and `commit` [B]; each stream's earlier frames come
        from its own state. The outputs are the bucket's own tensors: valid until its next
        replay."""
        b, n, _ = x.shape
        r = bucket.rows
        for static in (bucket.x, bucket.mu, bucket.cond, bucket.spks, bucket.past_len):
            static.zero_()
        bucket.lengths.fill_(1)
        bucket.commit.fill_(1)
        bucket.t.copy_(t.expand(2 * r))
        frames = torch.tensor([s.frames for s in streams], device=x.device)
        for half in (slice(0, b), slice(r, r + b)):
            bucket.x[half, :n].copy_(x)
            bucket.lengths[half].copy_(lengths)
            bucket.commit[half].copy_(commit)
            bucket.past_len[half].copy_(frames)
        bucket.mu[:b, :n].copy_(mu)
        bucket.cond[:b, :n].copy_(cond)
        bucket.spks[:b].copy_(spks)
        for i, stream in enumerate(streams):
            bucket.tails[:, :, i].copy_(stream.tails[step])
            if bucket.past:
                stream.copy_past(step, bucket.past_kv[:, :, :, i])
        output: DiTStep = replay(bucket, self._run)
        return output
