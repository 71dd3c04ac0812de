"""The flow's streamed Euler loop replayed from CUDA graphs for small batches.

At small batch sizes the ten-step loop is bound by the host launching its ~13,000 kernels, not by
the GPU. Captured once per bucket at warm-up, a call pads its inputs into the bucket's static
buffers (padding is masked, exactly as in a mixed-length batch) and replays the graph: one launch
instead of thousands. Eagerly, the loop costs about 0.8 s of host time per call whatever the
batch size, so graphs matter at every size that streams: first chunks (no earlier frames, prompt
included: up to `max_frames` for small batches, `wide_frames` for large ones) and chunks after
earlier frames (later chunks of one or two hops, first chunks started from a prompt's state: each
of the `later_frames` widths after up to `max_past` earlier frames), up to the largest batch.
Other calls run eagerly.
Nothing is captured while serving.

The graphs read each row's earlier frames from its pages of the flow states' store and record
its new frames in its own pages (`flow_state.py`), in place: a bucket holds only where to (its
slots) and the convolution tails, whose buffers every bucket shares (replays never overlap, and
each call's tails are copied into the requests' states before the next). The store must stay
where it was when the graphs were captured (`FlowPages.fixed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker.engines.cosyvoice.flow_decoder import EulerSolver
from worker.engines.cosyvoice.flow_state import CallPages, FlowPages, FlowState, SolverHistory
from worker.engines.cosyvoice.graphs import capture_all, replay, usable


def later_chunk_widths(hops: int, grid: int, lookahead: int) -> tuple[int, ...]:
    """New frames of the buckets for chunks after earlier frames, when later chunks take up to
    `hops` hops of the `grid` frames: one hop and two (second chunks, first chunks from a
    prompt's state) and `hops`, each with the `lookahead` frames a final chunk's look-ahead
    tokens add (56, 106 and 206 frames for four hops on the released models). A final chunk
    between two widths takes the wider."""
    return tuple(sorted({n * grid + lookahead for n in (1, 2, hops)}))


@dataclass
class _Bucket:
    rows: int
    frames: int
    past: int
    noise: torch.Tensor
    mask: torch.Tensor
    mu: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    bias: torch.Tensor
    history: SolverHistory
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def load(self, noise: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
             cond: torch.Tensor, bias: torch.Tensor, states: list[FlowState | None],
             kept_frames: torch.Tensor, pages: CallPages) -> None:
        """Copy a call's inputs in; padding rows and frames are zero (masked out)."""
        b, _, t = noise.shape
        for static, value in ((self.noise, noise), (self.mask, mask), (self.mu, mu),
                              (self.cond, cond)):
            static.zero_()
            static[:b, :, :t].copy_(value)
        self.spks.zero_()
        self.spks[:b].copy_(spks)
        self.bias.fill_(-1.0e10)
        width_past = bias.size(2) - t
        self.bias[:b, :t, :width_past].copy_(bias[:, :, :width_past])
        self.bias[:b, :t, self.past : self.past + t].copy_(bias[:, :, width_past:])
        self.history.store = pages.store.flat()  # the captured store itself, on a GPU
        self.history.load(states, kept_frames, pages.slots(self.rows, self.past, self.frames))


class SolverGraphs:
    """Graphs for first chunks (up to `max_frames` frames for batches up to `max(rows)`, up to
    `wide_frames` for the batch sizes in `wide_rows`) and for chunks after earlier frames (up to
    each of the `later_frames` widths after up to `max_past` earlier ones, every batch size).

    The defaults fit the released model's 50-frame chunk grid and 6-frame look-ahead: a state
    holds whole chunks (earlier frames come in multiples of 50, bucketed by 100), and a chunk
    after them is one hop or two plus what a final chunk's look-ahead adds (56 or 106 frames),
    so a bucket computes few frames that no row needs. Every bucket reads and writes the store
    of `pages` (set before `capture`).
    """

    def __init__(
        self, solver: EulerSolver, dtype: torch.dtype, device: torch.device, steps: int,
        rows: tuple[int, ...] = (1, 2, 4, 8), frame_step: int = 100, max_frames: int = 1000,
        later_frames: tuple[int, ...] = (56, 106), wide_rows: tuple[int, ...] = (16, 32, 64),
        wide_frames: int = 300, max_past: int = 800,
    ) -> None:
        self.solver = solver
        self.steps = steps
        self.rows = tuple(sorted(set(rows) | set(wide_rows)))
        self.frame_step = frame_step
        self.later_frames = tuple(sorted(later_frames))
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self.pages: FlowPages | None = None
        """The store the graphs are captured over (and fix)."""
        estimator = solver.estimator
        mel = estimator.cfg.out_channels
        convs = estimator.convolutions
        sizes = [(r, f, 0) for r in rows for f in range(frame_step, max_frames + 1, frame_step)]
        sizes += [(r, f, 0) for r in wide_rows for f in range(frame_step, wide_frames + 1,
                                                             frame_step)]
        sizes += [(r, f, p) for f in self.later_frames for r in self.rows
                  for p in range(frame_step, max_past + 1, frame_step)]
        per_row = steps * len(convs) * 2 * max(convs) * 2
        most = max(self.rows)
        tails = torch.zeros(per_row * most, device=device, dtype=dtype)
        tails_out = torch.zeros(per_row * most, device=device, dtype=dtype)

        def view(flat: torch.Tensor, *shape: int) -> torch.Tensor:
            return flat[: math.prod(shape)].view(*shape)

        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=kind)

        for r, f, p in sizes:
            history = SolverHistory(
                store=zeros(0),  # the call's store, at each load
                write_slots=zeros(r * f, kind=torch.long),
                read_slots=zeros(r * (p + f), kind=torch.long),
                tails=view(tails, steps, len(convs), 2, r, max(convs), 2),
                tail_index=zeros(2 * r, 1, 2, kind=torch.long),
                tails_out=view(tails_out, steps, len(convs), 2, r, max(convs), 2),
            )
            self._buckets[(r, f, p)] = _Bucket(
                rows=r, frames=f, past=p, noise=zeros(r, mel, f), mask=zeros(r, 1, f),
                mu=zeros(r, mel, f), spks=zeros(r, mel), cond=zeros(r, mel, f),
                bias=zeros(r, f, p + f), history=history,
            )

    def _run(self, bucket: _Bucket, steps: int | None = None) -> torch.Tensor:
        return self.solver.solve(bucket.noise, bucket.mask, bucket.mu, bucket.spks, bucket.cond,
                                 bucket.bias, steps or self.steps, bucket.history)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graph over the store of `pages` (CUDA only), each after one
        eager step: every step has the same shapes, and the eager loop's host time was half of
        a capture's. The store is fixed from then on."""
        if self.pages is None:
            raise RuntimeError("the solver's graphs need the flow states' store to capture over")
        pages = self.pages
        for bucket in self._buckets.values():
            bucket.history.store = pages.flat()
        device = next(iter(self._buckets.values())).noise.device
        capture_all(self._buckets.values(), self._run, device,
                    warm=lambda bucket: self._run(bucket, steps=1))
        pages.fixed = True

    def later_width(self, frames: int) -> int:
        """The new frames' width of the buckets that `frames` new frames after earlier ones
        take (0 if wider than all)."""
        return next((f for f in self.later_frames if f >= frames), 0)

    def bucket_for(self, rows: int, frames: int, past: int, steps: int) -> _Bucket | None:
        if steps != self.steps:
            return None
        p = -(-past // self.frame_step) * self.frame_step
        r = next((r for r in self.rows if r >= rows), None)
        f = self.later_width(frames) if p > 0 else -(-frames // self.frame_step) * self.frame_step
        return self._buckets.get((r, f, p)) if r is not None and f > 0 else None

    @torch.inference_mode()
    def solve(
        self, noise: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
        cond: torch.Tensor, bias: torch.Tensor, states: list[FlowState | None],
        kept_frames: torch.Tensor, steps: int, pages: CallPages,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The streamed solver's new frames (recorded in the rows' `pages`) and convolution
        tails for these inputs from a bucket's graph; None when no bucket fits (or graphs were
        never captured, except on the CPU, where the bucket runs eagerly).

        The tails are a view of the shared buffers: valid until the next call.
        """
        b, _, t = noise.shape
        bucket = usable(self.bucket_for(b, t, bias.size(2) - t, steps), noise.is_cuda)
        if bucket is None:
            return None
        bucket.load(noise, mask, mu, spks, cond, bias, states, kept_frames, pages)
        output: torch.Tensor = replay(bucket, self._run)
        return output[:b, :, :t].clone(), bucket.history.tails_out[:, :, :, :b]
