"""CosyVoice3's streamed DiT estimator replayed from CUDA graphs, one Euler step per replay.

Eagerly, one estimator call is about 700 small kernels (22 blocks), and a chunk makes ten of
them: at small batches the host launching them is the cost, not the GPU. A bucket holds static
inputs for `rows` requests of up to `frames` new frames after up to `past` earlier ones, guided
rows first and unguided ones `rows` later, as the solver stacks them: the rows' inputs, where
their keys and values lie in the flow's store of pages (`flow_state.paged_slots`: each Euler step
has pages of its own, so one graph serves every step) and their convolution tails. A step copies
those in and replays the graph, which reads each row's earlier keys and values from the store in
place, records the new frames' there, and fills the velocity and the new tails (padding rows
have one valid frame and no past, so attention stays finite, and write to the store's scratch
page; their output is dropped). The store must stay where it was when the graphs were captured
(`FlowPages.fixed`). Nothing is captured while serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engines.cosyvoice.flow_state import FlowPages, PagedFrames
from worker.engines.cosyvoice.graphs import capture_all, replay, usable
from worker.engines.cosyvoice.v3_dit import POS_KERNEL, DiT, StepCache


@dataclass
class DiTStep:
    """A step's outputs for the rows of a call: velocity [2R, N, mel] and both position
    convolutions' tails [2R, dim, 30] (the new frames' keys and values are in the store)."""

    velocity: torch.Tensor
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
    write_slots: torch.Tensor
    """[rows * frames]: where the new frames' keys and values go in the store."""
    read_slots: torch.Tensor
    """[rows * (past + frames)]: each row's earlier frames in the store, then its new ones."""
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
        self.pages: FlowPages | None = None
        """The store the graphs are captured over (and fix)."""
        cfg = estimator.cfg
        sizes = [(r, f, 0) for r in self.rows
                 for f in range(frame_step, first_frames + 1, frame_step)]
        sizes += [(r, f, p) for r in self.rows for f in self.later_frames
                  for p in range(frame_step, max_past + 1, frame_step)]
        sizes += [(r, f, p) for r in self.rows
                  for f in range(frame_step, prefixed_frames + 1, frame_step)
                  if f > self.later_frames[-1]
                  for p in range(frame_step, max_prefix + 1, frame_step)]

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
                write_slots=zeros(r * f, kind=torch.long),
                read_slots=zeros(r * (p + f), kind=torch.long),
                tails=zeros(2, 2, r, cfg.dim, POS_KERNEL - 1),
            )

    def _run(self, bucket: _Bucket) -> DiTStep:
        if self.pages is None:
            raise RuntimeError("the estimator's graphs need the flow's store of pages")
        tails = bucket.tails.flatten(1, 2)
        frames = PagedFrames(self.pages.flat()[0], bucket.write_slots, bucket.read_slots)
        cache = StepCache(bucket.past_len, frames, [tails[0], tails[1]], bucket.commit)
        velocity = self.estimator(bucket.x, bucket.mu, bucket.cond, bucket.spks, bucket.t,
                                  bucket.lengths, cache, True)
        return DiTStep(velocity, cache.new_tails)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graph over the store of `pages` (CUDA only); the store is
        fixed from then on."""
        if self.pages is None:
            raise RuntimeError("the estimator's graphs need the flow's store to capture over")
        device = next(iter(self._buckets.values())).x.device
        capture_all(self._buckets.values(), self._run, device)
        self.pages.fixed = True

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
        self, bucket: _Bucket, pages: FlowPages, x: torch.Tensor, mu: torch.Tensor,
        cond: torch.Tensor, spks: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor,
        commit: torch.Tensor, past_len: torch.Tensor, write_slots: torch.Tensor,
        read_slots: torch.Tensor, tails: torch.Tensor,
    ) -> DiTStep:
        """One Euler step of the estimator for a call's rows: `x`, `mu`, `cond` [B, N, mel]
        and `spks` [B, spk] of the guided rows (the unguided ones get zeros for all but `x`),
        `t` the time, `lengths`, `commit` and `past_len` (earlier frames) [B]; the step's
        slots in `pages` for the bucket's rows (`paged_slots`) and the rows' tails [2 convs,
        2, B, dim, 30]. The outputs are the bucket's own tensors: valid until its next
        replay."""
        if self.pages is None:
            self.pages = pages  # on the CPU: no capture fixed one
        if pages is not self.pages:
            raise ValueError("the estimator's graphs read the store they were captured over")
        b, n, _ = x.shape
        r = bucket.rows
        for static in (bucket.x, bucket.mu, bucket.cond, bucket.spks, bucket.past_len,
                       bucket.tails):
            static.zero_()
        bucket.lengths.fill_(1)
        bucket.commit.fill_(1)
        bucket.t.copy_(t.expand(2 * r))
        for half in (slice(0, b), slice(r, r + b)):
            bucket.x[half, :n].copy_(x)
            bucket.lengths[half].copy_(lengths)
            bucket.commit[half].copy_(commit)
            bucket.past_len[half].copy_(past_len)
        bucket.mu[:b, :n].copy_(mu)
        bucket.cond[:b, :n].copy_(cond)
        bucket.spks[:b].copy_(spks)
        bucket.write_slots.copy_(write_slots)
        bucket.read_slots.copy_(read_slots)
        bucket.tails[:, :, :b].copy_(tails)
        output: DiTStep = replay(bucket, self._run)
        return output
