"""The flow's token encoder replayed from CUDA graphs.

Every chunk re-encodes its utterance's tokens so far (a few percent of the flow's arithmetic), but
eagerly that is about a thousand small kernels: at one stream, tens of milliseconds of host time
before the first audio. Captured once per (rows, tokens) bucket at warm-up, a call pads its
tokens into the bucket's static buffers (padding is absent tokens and invalid frames, masked as
in a mixed-length batch) and replays the graph. Batches above the engine's largest bucket
(`encoder_graph_rows`, `max_audio_rows` by default) and longer utterances run eagerly (58 ms
at 64 rows on an H200). Nothing is captured while serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engines.cosyvoice.graphs import capture_all, replay, usable

Encode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(token ids [B, W + look], present [B, W + look], valid [B, W], streaming [B]) -> features
[B, stride * W, C]."""


@dataclass
class _Bucket:
    token_ids: torch.Tensor
    present: torch.Tensor
    valid: torch.Tensor
    streaming: torch.Tensor
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None

    def load(self, token_ids: torch.Tensor, present: torch.Tensor, valid: torch.Tensor,
             streaming: torch.Tensor) -> None:
        for static, value in ((self.token_ids, token_ids), (self.present, present),
                              (self.valid, valid)):
            static.zero_()
            static[: value.size(0), : value.size(1)].copy_(value)
        self.streaming.zero_()
        self.streaming[: streaming.size(0)].copy_(streaming)


class EncoderGraphs:
    def __init__(
        self, encode: Encode, lookahead: int, stride: int, device: torch.device,
        rows: tuple[int, ...] = (1, 2, 4, 8, 16), width_step: int = 64,
        max_width: int = 512,
    ) -> None:
        self.encode = encode
        self.lookahead = lookahead
        self.stride = stride
        self.rows = rows
        self.width_step = width_step
        self.max_width = max_width
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        for r in rows:
            for w in range(width_step, max_width + 1, width_step):
                self._buckets[(r, w)] = _Bucket(
                    token_ids=torch.zeros(r, w + lookahead, dtype=torch.long, device=device),
                    present=torch.zeros(r, w + lookahead, dtype=torch.bool, device=device),
                    valid=torch.zeros(r, w, dtype=torch.bool, device=device),
                    streaming=torch.zeros(r, dtype=torch.bool, device=device),
                )

    def _run(self, bucket: _Bucket) -> torch.Tensor:
        return self.encode(bucket.token_ids, bucket.present, bucket.valid, bucket.streaming)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graph (CUDA only)."""
        device = next(iter(self._buckets.values())).valid.device
        capture_all(self._buckets.values(), self._run, device)

    def bucket_for(self, rows: int, width: int) -> _Bucket | None:
        r = next((r for r in self.rows if r >= rows), None)
        w = -(-width // self.width_step) * self.width_step
        return self._buckets.get((r, w)) if r is not None else None

    @torch.inference_mode()
    def run(self, token_ids: torch.Tensor, present: torch.Tensor, valid: torch.Tensor,
            streaming: torch.Tensor) -> torch.Tensor | None:
        """The encoder's features for these inputs from a bucket's graph; None when no bucket
        fits (or graphs were never captured, except on the CPU, where the bucket runs eagerly).
        """
        b, width = valid.shape
        bucket = usable(self.bucket_for(b, width), valid.is_cuda)
        if bucket is None:
            return None
        bucket.load(token_ids, present, valid, streaming)
        output: torch.Tensor = replay(bucket, self._run)
        return output[:b, : self.stride * width].clone()
