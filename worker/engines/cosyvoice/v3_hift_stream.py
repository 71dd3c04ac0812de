"""Streaming the CosyVoice3 vocoder: per-request states, chunks of several requests per call.

Each `advance` computes only the new part of every stage: the F0 of frames that have their
3-frame look-ahead (re-reading the 8 frames its causal convolutions look back over; F0 in
float64), their excitation (the harmonic phase sum carried in float64), the STFT frames of the
new excitation samples, the decoder on the new frames with every causal convolution continuing
from its kept input (`Tails`), and the inverse STFT's overlap-add carried across chunks. So each
emitted sample equals the whole pass's, and a chunk costs its own frames, never the utterance so
far. Nothing is shared between requests: the noise buffers are indexed by each request's own
sample positions.

A sample is released once no later frame can change it: a non-final call decodes up to 4 frames
before the end (`conv_pre`'s look-ahead) and releases all but the last 4 samples of them. Rows
that are at the same point (first chunk or not, final or not, as many new frames) run as one
batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from worker.engines.cosyvoice.v3_hift import F0_AHEAD, CausalHiFT, HiFTNoise, Tails
from worker.engines.cosyvoice.v3_hift_graphs import V3VocoderGraphs

F0_BEHIND = 8


@dataclass(eq=False)
class HiFTStream:
    """One request: mel frames from `mel_start`, excitation samples from `src_start` (up to
    frame `f0_frames`), the phase sum, frames through `conv_pre` (`decoded`), every causal
    convolution's kept input, the overlap-add carry [2, n_fft - hop] (signal, window energy)
    and the samples emitted."""

    mel: torch.Tensor
    source: torch.Tensor
    phase: torch.Tensor
    mel_start: int = 0
    src_start: int = 0
    f0_frames: int = 0
    decoded: int = 0
    emitted: int = 0
    finished: bool = False
    tails: torch.Tensor | None = None
    """[total]: every causal convolution's kept input (`CausalHiFT.tail_layout`)"""
    carry: torch.Tensor | None = None

    @staticmethod
    def new(channels: int, harmonics: int, device: torch.device) -> HiFTStream:
        return HiFTStream(torch.zeros(channels, 0, device=device),
                          torch.zeros(0, device=device),
                          torch.zeros(harmonics, dtype=torch.float64, device=device))

    @property
    def frames(self) -> int:
        return self.mel_start + self.mel.size(1)

    def nbytes(self) -> int:
        held = [self.mel, self.source, *([] if self.tails is None else [self.tails])]
        return sum(t.numel() * t.element_size() for t in held)


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad [C, n_i] (or [n_i]) tensors with zeros to one batch."""
    width = max(r.size(-1) for r in rows)
    return torch.stack([F.pad(r, (0, width - r.size(-1))) for r in rows])


def _excite(hift: CausalHiFT, streams: list[HiFTStream], final: list[bool],
            noise: HiFTNoise) -> None:
    """F0 and excitation of every frame that has its look-ahead now (one padded batch)."""
    rows, windows, firsts, ends = [], [], [], []
    for i, (s, fin) in enumerate(zip(streams, final, strict=True)):
        end = s.frames if fin else s.frames - F0_AHEAD
        if end <= s.f0_frames:
            continue
        first = max(s.f0_frames - F0_BEHIND, s.mel_start)
        mel = s.mel[:, first - s.mel_start:]
        rows.append(i)
        windows.append(F.pad(mel, (0, F0_AHEAD)) if fin else mel)
        firsts.append(first)
        ends.append(end)
    if not rows:
        return
    f0_all = hift.f0_predictor(_stack(windows), final=False).float()
    f0s = [f0_all[r, streams[i].f0_frames - first: end - first]
           for r, (i, first, end) in enumerate(zip(rows, firsts, ends, strict=True))]
    # Padding frames have F0 0, which adds exactly nothing to a row's phase sum.
    source, sums = hift.excitation(
        _stack(f0s), torch.stack([streams[i].phase for i in rows]),
        [streams[i].f0_frames * hift.scale for i in rows], noise)
    for r, (i, f0) in enumerate(zip(rows, f0s, strict=True)):
        s = streams[i]
        s.source = torch.cat([s.source, source[r, 0, : f0.numel() * hift.scale]])
        s.phase = sums[r]
        s.f0_frames += f0.numel()


def _stft_input(hift: CausalHiFT, s: HiFTStream, m0: int, m1: int, final: bool) -> torch.Tensor:
    """Excitation samples under STFT frames m0..m1, reflected at the utterance's ends."""
    half = hift.cfg.n_fft // 2
    hop = hift.cfg.hop_len
    idx = torch.arange(hop * m0 - half, hop * m1 + half, device=s.source.device)
    idx = idx.abs()
    if final:
        n = s.f0_frames * hift.scale
        idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)
    return s.source[idx - s.src_start]


def _decode(hift: CausalHiFT, group: list[HiFTStream], ends: list[int], final: bool,
            out: dict[HiFTStream, torch.Tensor], graphs: V3VocoderGraphs | None = None) -> None:
    cfg, hop, n_fft = hift.cfg, hift.cfg.hop_len, hift.cfg.n_fft
    per_frame = hift.scale // hop
    first = group[0].decoded == 0
    look = 0 if final else hift.look_right
    mel = torch.stack([s.mel[:, s.decoded - s.mel_start: e + look - s.mel_start]
                       for s, e in zip(group, ends, strict=True)])
    m0s = [0 if first else per_frame * s.decoded + 1 for s in group]
    source = torch.stack([_stft_input(hift, s, m0, per_frame * e, final)
                          for s, m0, e in zip(group, m0s, ends, strict=True)])
    layout = hift.tail_layout()
    kept_before = None if first else torch.stack([s.tails for s in group if s.tails is not None])
    replayed = None if graphs is None else graphs.decode(
        mel, ends[0] - group[0].decoded, source, kept_before)
    if replayed is not None:
        frames, kept = replayed
    else:
        tails = Tails({} if kept_before is None else layout.split(kept_before))
        frames = hift.stream_frames(mel, source, tails, first, final)  # [B, F, n_fft]
        kept = layout.join(tails.store)
    count = frames.size(1)
    length = hop * (count - 1) + n_fft
    fold = {"output_size": (1, length), "kernel_size": (1, n_fft), "stride": (1, hop)}
    wav = F.fold(frames.transpose(1, 2), **fold).view(len(group), length)
    energy = F.fold((hift.window**2).view(1, n_fft, 1).expand(1, -1, count), **fold)
    acc = torch.stack([wav, energy.view(1, length).expand(len(group), -1)], dim=1)
    if not first:
        acc[:, :, : n_fft - hop] += torch.stack([s.carry for s in group if s.carry is not None])
    keep = length if final else length - (n_fft - hop)
    done = acc[:, 0, :keep] / acc[:, 1, :keep]
    kept_rows = kept.unbind(0)
    for b, (s, m0, e) in enumerate(zip(group, m0s, ends, strict=True)):
        start = hop * m0 - n_fft // 2  # sample of done[:, 0]
        stop = e * hift.scale if final else start + keep
        out[s] = torch.clamp(done[b, s.emitted - start: stop - start],
                             -cfg.audio_limit, cfg.audio_limit)
        s.emitted = stop
        s.carry = acc[b, :, keep:]
        s.tails = kept_rows[b]
        s.decoded = e
        next_start = hop * (per_frame * e + 1) - n_fft // 2
        s.source = s.source[next_start - s.src_start:]
        s.src_start = next_start


@torch.inference_mode()
def advance(
    hift: CausalHiFT, streams: list[HiFTStream], mels: list[torch.Tensor], final: list[bool],
    noise: HiFTNoise, graphs: V3VocoderGraphs | None = None,
) -> list[torch.Tensor]:
    """Append mel frames [80, n_i] to each request; returns its newly completed samples (the
    decoder replayed from `graphs` where a bucket fits)."""
    if any(s.finished for s in streams):
        raise ValueError("a request's vocoder stream has already finished")
    for s, mel in zip(streams, mels, strict=True):
        s.mel = torch.cat([s.mel, mel.float().to(s.mel.device)], dim=1)
    _excite(hift, streams, final, noise)
    groups: dict[tuple[bool, bool, int], list[tuple[HiFTStream, int]]] = {}
    for s, fin in zip(streams, final, strict=True):
        end = s.frames if fin else min(s.frames - hift.look_right, s.f0_frames - 1)
        if end > s.decoded:
            groups.setdefault((s.decoded == 0, fin, end - s.decoded), []).append((s, end))
    out: dict[HiFTStream, torch.Tensor] = {}
    for (_, fin, _), rows in groups.items():
        _decode(hift, [s for s, _ in rows], [e for _, e in rows], fin, out, graphs)
    for s, fin in zip(streams, final, strict=True):
        s.finished = fin
        keep = min(s.decoded, s.f0_frames - F0_BEHIND)
        if keep > s.mel_start:
            s.mel = s.mel[:, keep - s.mel_start:]
            s.mel_start = keep
    return [out.get(s, torch.zeros(0, device=s.mel.device)) for s in streams]
