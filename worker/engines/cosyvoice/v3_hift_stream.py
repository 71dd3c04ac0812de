"""Streaming the CosyVoice3 vocoder: per-request states, chunks of several requests per call.

Each `advance` computes the F0 and excitation of a request's new frames only (the F0 predictor
re-reads the 8 frames its causal convolutions look back over; the harmonic phase sum is carried
in float64) and then decodes the new frames plus `CONTEXT` earlier ones: the decoder's left
receptive field is about 37 frames, so every emitted sample equals the whole pass's. The cost per
chunk is bounded by chunk + `CONTEXT` frames, never by the utterance so far, and nothing is shared
between requests: the noise buffers are indexed by each request's own sample positions.

Samples are released as soon as no later frame can change them: a non-final call keeps back its
last 3 + 4 + 1 frames (F0 look-ahead, `conv_pre` look-ahead, the inverse STFT's overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from worker.engines.cosyvoice.v3_hift import F0_AHEAD, CausalHiFT, HiFTNoise

F0_BEHIND = 8
CONTEXT = 40


@dataclass(eq=False)
class HiFTStream:
    """One request: mel frames from `start` on, the excitation of frames [start, f0_frames)
    (`source`), the phase sum after frame f0_frames - 1, and the samples already emitted."""

    mel: torch.Tensor
    source: torch.Tensor
    phase: torch.Tensor
    start: int = 0
    f0_frames: int = 0
    emitted: int = 0
    finished: bool = False

    @staticmethod
    def new(channels: int, harmonics: int, device: torch.device) -> HiFTStream:
        return HiFTStream(torch.zeros(channels, 0, device=device),
                          torch.zeros(0, device=device),
                          torch.zeros(harmonics, dtype=torch.float64, device=device))

    @property
    def frames(self) -> int:
        return self.start + self.mel.size(1)


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad [C, n_i] (or [n_i]) tensors with zeros to one batch."""
    width = max(r.size(-1) for r in rows)
    return torch.stack([F.pad(r, (0, width - r.size(-1))) for r in rows])


def _new_f0(hift: CausalHiFT, streams: list[HiFTStream], final: list[bool]) -> list[torch.Tensor]:
    """F0 of every frame that has its look-ahead now, per request (one padded batch)."""
    out = [torch.zeros(0, device=s.mel.device) for s in streams]
    rows, windows, firsts = [], [], []
    for i, (s, fin) in enumerate(zip(streams, final, strict=True)):
        if (s.frames if fin else s.frames - F0_AHEAD) <= s.f0_frames:
            continue
        first = max(s.f0_frames - F0_BEHIND, s.start)
        mel = s.mel[:, first - s.start:]
        rows.append(i)
        windows.append(F.pad(mel, (0, F0_AHEAD)) if fin else mel)
        firsts.append(first)
    if rows:
        f0 = hift.f0_predictor(_stack(windows), final=False).float()
        for row, (i, first) in enumerate(zip(rows, firsts, strict=True)):
            s = streams[i]
            end = s.frames if final[i] else s.frames - F0_AHEAD
            out[i] = f0[row, s.f0_frames - first: end - first]
    return out


def _decode(hift: CausalHiFT, mels: list[torch.Tensor], sources: list[torch.Tensor],
            final: bool) -> torch.Tensor:
    return hift.decode(_stack(mels), _stack(sources).unsqueeze(1), final)


@torch.inference_mode()
def advance(
    hift: CausalHiFT, streams: list[HiFTStream], mels: list[torch.Tensor], final: list[bool],
    noise: HiFTNoise,
) -> list[torch.Tensor]:
    """Append mel frames [80, n_i] to each request; returns its newly completed samples."""
    scale = hift.scale
    for s, mel in zip(streams, mels, strict=True):
        if s.finished:
            raise ValueError("this request's vocoder stream has already finished")
        s.mel = torch.cat([s.mel, mel.float().to(s.mel.device)], dim=1)
    f0s = _new_f0(hift, streams, final)
    live = [i for i, f in enumerate(f0s) if f.numel()]
    if live:
        f0 = _stack([f0s[i] for i in live])
        phase = torch.stack([streams[i].phase for i in live])
        # Padding frames have F0 0, which adds exactly nothing to a row's phase sum.
        source, sums = hift.excitation(
            f0, phase, [streams[i].f0_frames * scale for i in live], noise)
        for row, i in enumerate(live):
            s, n = streams[i], f0s[i].numel()
            s.source = torch.cat([s.source, source[row, 0, : n * scale]])
            s.phase = sums[row]
            s.f0_frames += n
    out: list[torch.Tensor] = [torch.zeros(0, device=s.mel.device) for s in streams]
    groups: dict[bool, list[int]] = {False: [], True: []}
    held = hift.look_right + 1
    for i, (s, fin) in enumerate(zip(streams, final, strict=True)):
        end = s.f0_frames if fin else s.f0_frames - held
        if end * scale > s.emitted:
            groups[fin].append(i)
    for fin, rows in groups.items():
        batches = [[i] for i in rows] if fin else ([rows] if rows else [])
        for batch in batches:
            firsts = [max(streams[i].emitted // scale - CONTEXT, streams[i].start) for i in batch]
            wav = _decode(
                hift,
                [streams[i].mel[:, w - streams[i].start: streams[i].f0_frames - streams[i].start]
                 for i, w in zip(batch, firsts, strict=True)],
                [streams[i].source[(w - streams[i].start) * scale:]
                 for i, w in zip(batch, firsts, strict=True)],
                fin,
            )
            for row, (i, w) in enumerate(zip(batch, firsts, strict=True)):
                s = streams[i]
                end = (s.f0_frames if fin else s.f0_frames - held) * scale
                out[i] = wav[row, s.emitted - w * scale: end - w * scale]
                s.emitted = end
    for s, fin in zip(streams, final, strict=True):
        s.finished = fin
        keep = min(s.f0_frames - F0_BEHIND, s.emitted // scale - CONTEXT)
        if keep > s.start:
            s.mel = s.mel[:, keep - s.start:]
            s.source = s.source[(keep - s.start) * scale:]
            s.start = keep
    return out
