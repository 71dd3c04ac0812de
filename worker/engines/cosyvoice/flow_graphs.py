"""The flow's Euler loop replayed from CUDA graphs for small batches.

At small batch sizes the ten-step loop is bound by the host launching its ~12,000 kernels, not by
the GPU. Captured once per (rows, frames) bucket at warm-up, a call pads its inputs into the
bucket's static buffers (padding is masked, exactly as in a mixed-length batch) and replays the
graph: one launch instead of thousands. Batches larger than the largest bucket are GPU-bound and
run eagerly. Nothing is captured while serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engines.cosyvoice.flow_decoder import EulerSolver


@dataclass
class _Bucket:
    rows: int
    frames: int
    noise: torch.Tensor
    mask: torch.Tensor
    mu: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    streaming: torch.Tensor
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def load(self, noise: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
             cond: torch.Tensor, streaming: torch.Tensor) -> None:
        """Copy a call's inputs in; padding rows and frames are zero (masked out)."""
        b, _, t = noise.shape
        for static, value in ((self.noise, noise), (self.mask, mask), (self.mu, mu),
                              (self.cond, cond)):
            static.zero_()
            static[:b, :, :t].copy_(value)
        self.spks.zero_()
        self.spks[:b].copy_(spks)
        self.streaming.zero_()
        self.streaming[:b].copy_(streaming)


class SolverGraphs:
    def __init__(
        self, solver: EulerSolver, channels: int, dtype: torch.dtype, device: torch.device,
        steps: int, rows: tuple[int, ...] = (1, 2, 4, 8), frame_step: int = 128,
        max_frames: int = 1024,
    ) -> None:
        self.solver = solver
        self.steps = steps
        self.rows = rows
        self.frame_step = frame_step
        self.max_frames = max_frames
        self._buckets: dict[tuple[int, int], _Bucket] = {}

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        for r in rows:
            for f in range(frame_step, max_frames + 1, frame_step):
                self._buckets[(r, f)] = _Bucket(
                    rows=r, frames=f, noise=zeros(r, channels, f), mask=zeros(r, 1, f),
                    mu=zeros(r, channels, f), spks=zeros(r, channels), cond=zeros(r, channels, f),
                    streaming=torch.zeros(r, dtype=torch.bool, device=device),
                )

    def _run(self, bucket: _Bucket) -> torch.Tensor:
        return self.solver.solve(bucket.noise, bucket.mask, bucket.mu, bucket.spks, bucket.cond,
                                 bucket.streaming, self.steps)

    @torch.inference_mode()
    def capture(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Record every bucket's graph (CUDA only)."""
        pool = torch.cuda.graph_pool_handle()
        device = next(iter(self._buckets.values())).noise.device
        side = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        for i, bucket in enumerate(self._buckets.values()):
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._run(bucket)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                bucket.output = self._run(bucket)
            bucket.graph = graph
            if progress is not None:
                progress(i + 1, len(self._buckets))
        torch.cuda.synchronize(device)

    def bucket_for(self, rows: int, frames: int, steps: int) -> _Bucket | None:
        if steps != self.steps:
            return None
        r = next((r for r in self.rows if r >= rows), None)
        f = -(-frames // self.frame_step) * self.frame_step
        if r is None or f > self.max_frames:
            return None
        return self._buckets[(r, f)]

    @torch.inference_mode()
    def solve(
        self, noise: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
        cond: torch.Tensor, streaming: torch.Tensor, steps: int,
    ) -> torch.Tensor | None:
        """The solver's output for these inputs from a bucket's graph; None when no bucket fits
        (or graphs were never captured, except on the CPU, where the bucket runs eagerly)."""
        b, _, t = noise.shape
        bucket = self.bucket_for(b, t, steps)
        if bucket is None:
            return None
        if bucket.graph is None and noise.is_cuda:
            return None
        bucket.load(noise, mask, mu, spks, cond, streaming)
        if bucket.graph is not None:
            bucket.graph.replay()
            assert bucket.output is not None
            output = bucket.output
        else:
            output = self._run(bucket)
        return output[:b, :, :t].clone()
