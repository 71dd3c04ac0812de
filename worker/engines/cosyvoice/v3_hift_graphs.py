"""CosyVoice3's streamed vocoder replayed from CUDA graphs: `conv_pre`, the excitation's STFT, the
decoder body and the inverse STFT's frames of one call, for a batch of streams.

Eagerly a call is about 1,500 operators at any batch size (the body alone 1,170: 85 convolutions,
72 Snake activations), tens of milliseconds of host time on a GPU. A bucket holds static inputs
for `rows` streams of up to `frames` mel frames, first chunks or later ones, and replays them as
one launch. A call of fewer frames is padded on the right: every convolution of the body looks
only left, and `conv_pre` only at its own window's frames, so an output frame never sees the
padding, and each convolution's kept input (`Tails`) is read at the call's own length, not the
bucket's, by an index the replay computes from the padding (`excess`). A final chunk runs as a
non-final one whose look-ahead frames are zeros, which is what the final pass pads with. The
F0 and excitation (float64, per stream windows), gathering the streams' inputs and the
overlap-add stay eager: about 130 operators at one row (each stream's kept inputs travel as one
flat row, `CausalHiFT.tail_layout`). Nothing is captured while serving; calls that fit no
bucket run eagerly. The engine's `vocoder_graphs` option (on by default) says whether to capture
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.engines.cosyvoice.graphs import capture_all, replay, usable
from worker.engines.cosyvoice.v3_hift import CausalHiFT, Tails

FRAMES = (50, 100, 112)
"""Mel frames a bucket decodes: later chunks of one hop (50) and of two (100), first chunks
(46-94 after a released first chunk) and final chunks (up to two hops, the look-ahead and the
frames kept from the last call) padded up to the nearest."""

FINAL_EXTRA = 12
"""Frames a final chunk adds to its hops: the flow's look-ahead and what the last call kept."""


def chunk_frames(hops: int, hop_frames: int) -> tuple[int, ...]:
    """`FRAMES`, and for later chunks of `hops` hops of `hop_frames` their frames and a final
    chunk's of as many hops."""
    return tuple(sorted({*FRAMES, hops * hop_frames, hops * hop_frames + FINAL_EXTRA}))


class PaddedTails(Tails):
    """`Tails` for inputs padded on the right by `excess` mel frames (a 0-dim device tensor) past
    the call's own frames, in a call shaped for `frames` mel frames: each convolution keeps what
    it would keep unpadded."""

    def __init__(self, store: dict[nn.Module, torch.Tensor], excess: torch.Tensor,
                 frames: int) -> None:
        super().__init__(store)
        self.excess = excess
        self.frames = frames

    def kept(self, full: torch.Tensor, start: int, new: int) -> torch.Tensor:
        per_frame = new // self.frames  # this level's samples (or STFT frames) per mel frame
        unpadded = start - self.excess * per_frame
        return full.index_select(2, unpadded + torch.arange(full.size(2) - start,
                                                              device=full.device))


@dataclass
class _Bucket:
    rows: int
    frames: int
    first: bool
    mel: torch.Tensor
    """[rows, mels, frames + look-ahead]"""
    source: torch.Tensor
    """[rows, samples]: the excitation under the call's STFT frames"""
    excess: torch.Tensor
    tails: torch.Tensor | None
    """[rows, total]: every convolution's kept input (`TailLayout`); none for first chunks"""
    output: tuple[torch.Tensor, torch.Tensor] | None = None
    graph: torch.cuda.CUDAGraph | None = None


class V3VocoderGraphs:
    def __init__(self, hift: CausalHiFT, device: torch.device,
                 rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                 frames: tuple[int, ...] = FRAMES) -> None:
        self.hift = hift
        self.rows = rows
        self.frames = tuple(sorted(frames))
        self.layout = hift.tail_layout()
        mels = hift.cfg.in_channels
        self._buckets: dict[tuple[int, int, bool], _Bucket] = {}
        for r in rows:
            for n in self.frames:
                for first in (True, False):
                    self._buckets[(r, n, first)] = _Bucket(
                        rows=r, frames=n, first=first,
                        mel=torch.zeros(r, mels, n + hift.look_right, device=device),
                        source=torch.zeros(r, hift.source_samples(n, first), device=device),
                        excess=torch.zeros((), dtype=torch.long, device=device),
                        tails=None if first else torch.zeros(r, self.layout.total,
                                                              device=device))

    def _run(self, bucket: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        store = {} if bucket.tails is None else self.layout.split(bucket.tails)
        tails = PaddedTails(store, bucket.excess, bucket.frames)
        frames = self.hift.stream_frames(bucket.mel, bucket.source, tails, bucket.first)
        return frames, self.layout.join(tails.store)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every bucket's graph (CUDA only)."""
        device = next(iter(self._buckets.values())).mel.device
        capture_all(self._buckets.values(), self._run, device)

    def bucket_for(self, rows: int, frames: int, first: bool) -> _Bucket | None:
        r = next((r for r in self.rows if r >= rows), None)
        n = next((n for n in self.frames if n >= frames), None)
        if r is None or n is None:
            return None
        return self._buckets[(r, n, first)]

    @torch.inference_mode()
    def decode(
        self, mel: torch.Tensor, frames: int, source: torch.Tensor, tails: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`CausalHiFT.stream_frames` of `frames` new frames (mel holds their look-ahead too,
        except in a final call, whose look-ahead is zeros) after the kept inputs `tails`
        [B, total] (None: the first chunk) from a bucket's graph: its frames [B, F, n_fft] and
        what the convolutions keep [B, total]; None when no bucket fits (or graphs were never
        captured, except on the CPU, where the bucket runs eagerly)."""
        b = mel.size(0)
        first = tails is None
        bucket = usable(self.bucket_for(b, frames, first), mel.is_cuda)
        if bucket is None:
            return None
        bucket.mel.zero_()
        bucket.mel[:b, :, : mel.size(2)].copy_(mel)
        bucket.source.zero_()
        bucket.source[:b, : source.size(1)].copy_(source)
        bucket.excess.fill_(bucket.frames - frames)
        if bucket.tails is not None and tails is not None:
            bucket.tails[:b].copy_(tails)
        out, kept = replay(bucket, self._run)
        return out[:b, : self.hift.stft_frames(frames, first)].clone(), kept[:b].clone()
