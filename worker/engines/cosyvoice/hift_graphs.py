"""The vocoder replayed from CUDA graphs for the chunk shapes streaming repeats.

Eagerly one vocoder call is a few hundred convolutions and the STFTs around them, tens of
milliseconds of host time at one stream. Streamed chunks come in few shapes: a first chunk of
`2 x 25` mel frames, and later ones of that plus the 8-frame overlap, whose excitation starts
from the previous chunk's. Those get one graph per batch-size bucket, captured at warm-up; the
random inputs are drawn outside the graph (each row from its own generator) and copied in.
Other shapes (final chunks, other speeds or first-chunk lengths) run eagerly, as do batches
above the largest bucket. Nothing is captured while serving. The engine's `vocoder_graphs` option
(on by default) says whether to capture them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engines.cosyvoice.graphs import capture_all, replay, usable
from worker.engines.cosyvoice.hift import HiFTGenerator


@dataclass
class _Bucket:
    mel: torch.Tensor
    initial: torch.Tensor
    noise: torch.Tensor
    cache: torch.Tensor | None
    output: tuple[torch.Tensor, torch.Tensor] | None = None
    graph: torch.cuda.CUDAGraph | None = None


class VocoderGraphs:
    def __init__(
        self, hift: HiFTGenerator, device: torch.device, shapes: tuple[tuple[int, int], ...],
        rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    ) -> None:
        """`shapes` lists (mel frames, excitation samples carried over from the previous chunk;
        0 for none)."""
        self.hift = hift
        self.rows = rows
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        mels = hift.cfg.in_channels
        harmonics = hift.cfg.nb_harmonics + 1
        for r in rows:
            for frames, carried in shapes:
                samples = frames * hift.upsample_scale
                self._buckets[(r, frames, carried)] = _Bucket(
                    mel=torch.zeros(r, mels, frames, device=device),
                    initial=torch.zeros(r, harmonics, device=device),
                    noise=torch.zeros(r, samples, harmonics, device=device),
                    cache=torch.zeros(r, 1, carried, device=device) if carried else None,
                )

    def _run(self, bucket: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hift.vocode(bucket.mel, bucket.cache, bucket.initial, bucket.noise)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graph (CUDA only)."""
        device = next(iter(self._buckets.values())).mel.device
        capture_all(self._buckets.values(), self._run, device)

    def bucket_for(self, rows: int, frames: int, carried: int) -> _Bucket | None:
        r = next((r for r in self.rows if r >= rows), None)
        return self._buckets.get((r, frames, carried)) if r is not None else None

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor, cache: torch.Tensor | None, initial: torch.Tensor,
               noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`HiFTGenerator.vocode` from a bucket's graph; None when no bucket fits (or graphs
        were never captured, except on the CPU, where the bucket runs eagerly)."""
        b, _, frames = mel.shape
        carried = 0 if cache is None else cache.size(2)
        bucket = usable(self.bucket_for(b, frames, carried), mel.is_cuda)
        if bucket is None:
            return None
        for static, value in ((bucket.mel, mel), (bucket.initial, initial),
                              (bucket.noise, noise), (bucket.cache, cache)):
            if static is not None and value is not None:
                static.zero_()
                static[:b].copy_(value)
        speech, source = replay(bucket, self._run)
        return speech[:b].clone(), source[:b].clone()
