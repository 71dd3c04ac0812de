"""The CosyVoice3 vocoder: a causal HiFT (mel [B, 80, T] -> 24 kHz), whole or streamed per request.

Parameter names match the released `hift.pt` (weight norm folded on loading, as for CosyVoice2).
Every convolution looks only left, except `conv_pre` (4 frames ahead) and the F0 predictor's first
convolution (3 ahead); the F0 predictor runs in float64, as the released recipe requires. The
excitation's noise is not drawn per call: like the released recipe, fixed buffers (`HiFTNoise`)
are indexed by a sample's position in its utterance, so a request's audio depends on nothing but
its mel. The harmonic phase is a running sum over frames, accumulated in float64 exactly as the
reference's float32 `cumsum` on CPU does, and carried between chunks.

Streaming lives in `v3_hift_stream`.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import HiFTConfig
from worker.engines.cosyvoice.hift import Snake
from worker.engines.cosyvoice.v3_config import V3FlowConfig
from worker.engines.cosyvoice.v3_flow import NOISE_FRAMES as FLOW_NOISE_FRAMES
from worker.engines.cosyvoice.weights import hift_state, load_into, read_state

F0_AHEAD = 3


@dataclass
class HiFTNoise:
    """The fixed excitation noise: `sines` [samples, harmonics + 1], uniform in [0, 1).

    `draw(seed, samples)` takes, from one generator, first the (unused) initial-phase row and
    then the buffer, in the reference's order, so the buffer for a longer limit starts with the
    one for a shorter limit. `released` reproduces the reference loader's buffer."""

    sines: torch.Tensor

    @staticmethod
    def draw(seed: int, samples: int, harmonics: int = 9) -> HiFTNoise:
        gen = torch.Generator().manual_seed(seed)
        torch.rand(1, harmonics, generator=gen)
        return HiFTNoise(torch.rand(1, samples, harmonics, generator=gen)[0])

    @staticmethod
    def released(flow: V3FlowConfig, hift: HiFTConfig, samples: int) -> HiFTNoise:
        """The buffer the reference loader ends up with for a model of these dimensions.

        Its flow seeds the global generator with 0 and draws its fixed noise; then the flow's
        token embedding and speaker projection, the vocoder's F0 predictor and, first thing in
        the vocoder, these buffers are drawn from it. The same constructors replay those draws
        here, on a forked generator (the caller's random state is left as it was)."""
        with torch.random.fork_rng():
            torch.manual_seed(0)
            torch.randn(1, flow.output_size, FLOW_NOISE_FRAMES)
            nn.Embedding(flow.vocab_size, flow.input_size)
            nn.Linear(flow.spk_embed_dim, flow.output_size)
            cond = hift.f0_cond_channels
            nn.Conv1d(hift.in_channels, cond, F0_AHEAD + 1)
            for _ in range(4):
                nn.Conv1d(cond, cond, 3)
            nn.Linear(cond, 1)
            torch.rand(1, hift.nb_harmonics + 1)
            return HiFTNoise(torch.rand(1, samples, hift.nb_harmonics + 1)[0])


class Tails:
    """Streaming: what each convolution keeps of its input between chunks, for a batch of rows.

    `store` maps a convolution to its kept input [B, C, k]: the frames the next output needs
    that came earlier (zeros before the first chunk, as the whole pass pads)."""

    def __init__(self, store: dict[nn.Module, torch.Tensor]) -> None:
        self.store = store

    def run(self, conv: nn.Conv1d, x: torch.Tensor, pad: int) -> torch.Tensor:
        tail = self.store.get(conv)
        if tail is None:
            tail = x.new_zeros(x.size(0), x.size(1), pad)
        full = torch.cat([tail, x], dim=2)
        bias = None if conv.bias is None else conv.bias.to(x.dtype)
        out = conv._conv_forward(full, conv.weight.to(x.dtype), bias)
        self.store[conv] = self.kept(full, conv.stride[0] * out.size(2), x.size(2))
        return out

    def kept(self, full: torch.Tensor, start: int, new: int) -> torch.Tensor:
        """What the next chunk needs of a convolution's input `full` (its kept input, then
        `new` frames): from `start`, the first frame no output of this chunk began at."""
        return full[:, :, start:]


@dataclass(frozen=True)
class TailLayout:
    """Where each convolution's kept input lies in one flat row [total] per stream, so a
    call stacks, copies and splits a batch's tails as one tensor, not one per convolution."""

    convs: tuple[nn.Module, ...]
    shapes: tuple[tuple[int, int], ...]
    """(channels, frames) kept by each convolution"""

    @property
    def total(self) -> int:
        return sum(c * k for c, k in self.shapes)

    def split(self, flat: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """Views [B, C, k] of rows [B, total]."""
        parts = torch.split(flat, [c * k for c, k in self.shapes], dim=1)
        return {m: part.view(flat.size(0), c, k)
                for m, part, (c, k) in zip(self.convs, parts, self.shapes, strict=True)}

    def join(self, store: dict[nn.Module, torch.Tensor]) -> torch.Tensor:
        return torch.cat([store[m].flatten(1) for m in self.convs], dim=1)


class CausalConv(nn.Conv1d):
    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1,
                 ahead: bool = False) -> None:
        super().__init__(cin, cout, kernel, dilation=dilation)
        self.pad = (kernel - 1) * dilation
        self.ahead = ahead

    def forward(
        self, x: torch.Tensor, final: bool = True, tails: Tails | None = None
    ) -> torch.Tensor:
        """Left-causal: zeros before (or the kept tail). Looking ahead: zeros after when
        `final`, else the input's last `pad` frames are context only (the output is shorter)."""
        if tails is not None and not self.ahead:
            return tails.run(self, x, self.pad)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.ahead:
            x = F.pad(x, (self.pad, 0))
        elif final:
            x = F.pad(x, (0, self.pad))
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class CausalUpsample(nn.Conv1d):
    def __init__(self, cin: int, cout: int, kernel: int, rate: int) -> None:
        super().__init__(cin, cout, kernel)
        self.rate = rate

    def forward(self, x: torch.Tensor, tails: Tails | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=float(self.rate), mode="nearest")
        if tails is not None:
            return tails.run(self, x, self.kernel_size[0] - 1)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalDownsample(nn.Conv1d):
    def __init__(self, cin: int, cout: int, rate: int) -> None:
        super().__init__(cin, cout, rate * 2, stride=rate)
        self.rate = rate

    def forward(self, x: torch.Tensor, tails: Tails | None = None) -> torch.Tensor:
        if tails is not None:
            return tails.run(self, x, self.rate - 1)
        return super().forward(F.pad(x, (self.rate - 1, 0)))


class CausalResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(CausalConv(channels, channels, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(CausalConv(channels, channels, kernel) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, tails: Tails | None = None) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = c2(a2(c1(a1(x), tails=tails)), tails=tails) + x
        return x


class CausalF0Predictor(nn.Module):
    def __init__(self, in_channels: int, cond: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [CausalConv(in_channels, cond, F0_AHEAD + 1, ahead=True)]
        for _ in range(4):
            layers += [nn.ELU(), CausalConv(cond, cond, 3)]
        self.condnet = nn.Sequential(*layers, nn.ELU())
        self.classifier = nn.Linear(cond, 1)

    def forward(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        """F0 [B, T] (T - 3 when not `final`) from mel [B, 80, T], computed in float64."""
        x = self.condnet[0](mel.double(), final)
        for layer in list(self.condnet)[1:]:
            x = layer(x)
        weight, bias = self.classifier.weight.double(), self.classifier.bias.double()
        return torch.abs(F.linear(x.transpose(1, 2), weight, bias).squeeze(-1))


class _Source(nn.Module):
    def __init__(self, harmonics: int) -> None:
        super().__init__()
        self.l_linear = nn.Linear(harmonics, 1)


class CausalHiFT(nn.Module):
    def __init__(self, cfg: HiFTConfig, look_right: int = 4) -> None:
        super().__init__()
        self.cfg, self.look_right = cfg, look_right
        self.scale = int(np.prod(cfg.upsample_rates)) * cfg.hop_len
        self.m_source = _Source(cfg.nb_harmonics + 1)
        base = cfg.base_channels
        self.conv_pre = CausalConv(cfg.in_channels, base, look_right + 1, ahead=True)
        self.ups = nn.ModuleList(
            CausalUpsample(base // 2**i, base // 2 ** (i + 1), k, u)
            for i, (u, k) in enumerate(
                zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)))
        cum = np.cumprod([1, *list(cfg.upsample_rates[::-1][:-1])])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes, strict=True)):
            out = base // 2 ** (i + 1)
            self.source_downs.append(CausalConv(cfg.n_fft + 2, out, 1) if int(u) == 1
                                     else CausalDownsample(cfg.n_fft + 2, out, int(u)))
            self.source_resblocks.append(CausalResBlock(out, k, d))
        self.resblocks = nn.ModuleList(
            CausalResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True))
        last = base // 2 ** len(cfg.upsample_rates)
        self.conv_post = CausalConv(last, cfg.n_fft + 2, 7)
        self.f0_predictor = CausalF0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        self.window: torch.Tensor
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True),
                             persistent=False)
        self._tail_layout: TailLayout | None = None

    def excitation(
        self, f0: torch.Tensor, phase: torch.Tensor, offset: list[int], noise: HiFTNoise
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Source [B, 1, samples] for frames f0 [B, T] (float32), each row continuing from its
        running phase sum `phase` [B, harmonics] (float64) at sample `offset`; and the new sums."""
        cfg = self.cfg
        b, t = f0.shape
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        rad = (f0.unsqueeze(-1) * harmonics / cfg.sampling_rate) % 1
        total = phase.unsqueeze(1) + torch.cumsum(rad.double(), dim=1)
        sines = torch.sin(total.float() * 2 * np.pi * self.scale) * cfg.nsf_alpha
        uv = (f0 > cfg.nsf_voiced_threshold).float().unsqueeze(-1)
        amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        n = t * self.scale
        if max(offset) + n > noise.sines.size(0):
            raise ValueError(f"utterance exceeds the noise buffer ({noise.sines.size(0)} samples)")
        rows = torch.stack([noise.sines[o: o + n] for o in offset]).to(f0.device)
        rows = rows.view(b, t, self.scale, -1)
        waves = (sines * uv).unsqueeze(2) + amp.unsqueeze(2) * rows
        source = torch.tanh(self.m_source.l_linear(waves.flatten(1, 2)))
        return source.transpose(1, 2), total[:, -1]

    def stft(self, source: torch.Tensor, center: bool = True) -> torch.Tensor:
        """[B, n_fft + 2, frames]: real and imaginary parts of the excitation's STFT."""
        cfg = self.cfg
        spec = torch.stft(source, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.window,
                          center=center, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def body(self, x: torch.Tensor, s: torch.Tensor, tails: Tails | None = None,
             first: bool = True) -> torch.Tensor:
        """Spectra [B, n_fft + 2, F] from `conv_pre`'s output and the excitation's STFT frames.
        `first`: the chunk starts the utterance (the last level repeats its second frame)."""
        cfg = self.cfg
        kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope), tails=tails)
            if i == len(self.ups) - 1 and first:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s, tails=tails), tails=tails)
            acc = self.resblocks[i * kernels](x, tails=tails)
            for j in range(1, kernels):
                acc = acc + self.resblocks[i * kernels + j](x, tails=tails)
            x = acc / kernels
        return self.conv_post(F.leaky_relu(x), tails=tails)

    def stream_frames(self, mel: torch.Tensor, source: torch.Tensor, tails: Tails,
                      first: bool, final: bool = False) -> torch.Tensor:
        """Windowed time frames [B, F, n_fft] of a streamed call: mel [B, mels, n + look-ahead]
        (a final call's n alone: its look-ahead is zeros), the excitation under its STFT frames
        [B, samples] (no centring)."""
        x = self.conv_pre(mel, final)
        spec = self.stft(source, center=False)
        return self.frames(self.body(x, spec, tails, first))

    def stft_frames(self, frames: int, first: bool) -> int:
        """STFT frames under `frames` mel frames: a first call also has the one at sample 0."""
        return self.scale // self.cfg.hop_len * frames + (1 if first else 0)

    def source_samples(self, frames: int, first: bool) -> int:
        """Excitation samples under those STFT frames."""
        return self.cfg.hop_len * (self.stft_frames(frames, first) - 1) + self.cfg.n_fft

    def tail_layout(self) -> TailLayout:
        """What each convolution keeps between streamed chunks, read off (once) a one-frame
        first call: every call after the first keeps as much."""
        if self._tail_layout is None:
            probe = Tails({})
            device = self.window.device
            with torch.inference_mode():
                self.stream_frames(
                    torch.zeros(1, self.cfg.in_channels, 1 + self.look_right, device=device),
                    torch.zeros(1, self.source_samples(1, True), device=device), probe, True)
            self._tail_layout = TailLayout(
                tuple(probe.store), tuple((t.size(1), t.size(2)) for t in probe.store.values()))
        return self._tail_layout

    def frames(self, spectra: torch.Tensor) -> torch.Tensor:
        """Windowed time frames [B, F, n_fft] of spectra [B, n_fft + 2, F] (inverse STFT
        before overlap-add)."""
        cfg = self.cfg
        bins = cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(spectra[:, :bins]), max=1e2)
        phase = torch.sin(spectra[:, bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.fft.irfft(spec.transpose(1, 2), n=cfg.n_fft) * self.window

    def decode(self, mel: torch.Tensor, source: torch.Tensor, final: bool) -> torch.Tensor:
        """Samples from mel [B, 80, T] and excitation [B, 1, scale * T]: all of them when
        `final`, else the last `look_right + 1` frames' worth fewer."""
        cfg = self.cfg
        s = self.stft(source.squeeze(1))
        x = self.conv_pre(mel, final)
        if not final:
            s = s[:, :, : -int(np.prod(cfg.upsample_rates)) * self.look_right]
        x = self.body(x, s)
        bins = cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :bins]), max=1e2)
        phase = torch.sin(x[:, bins:])
        wav = torch.istft(
            torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase)),
            cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.window)
        if not final:
            wav = wav[:, : -self.scale]
        return torch.clamp(wav, -cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, noise: HiFTNoise, final: bool = True) -> torch.Tensor:
        """Waveform [B, samples] of whole utterances mel [B, 80, T] (the reference's
        `inference`: a non-final pass leaves out the frames still waiting for look-ahead)."""
        mel = mel.float()
        f0 = self.f0_predictor(mel, final).float()
        start = torch.zeros(mel.size(0), self.cfg.nb_harmonics + 1, dtype=torch.float64,
                            device=mel.device)
        source, _ = self.excitation(f0, start, [0] * mel.size(0), noise)
        return self.decode(mel[:, :, : f0.size(1)], source, final)


def samples_per_frame(cfg: HiFTConfig) -> int:
    return int(math.prod(cfg.upsample_rates)) * cfg.hop_len


def load_v3_hift(model_dir: Path, cfg: HiFTConfig, look_right: int) -> CausalHiFT:
    """The model of `model_dir/hift.pt` (CPU, float32, eval mode)."""
    model = CausalHiFT(cfg, look_right)
    path = model_dir / "hift.pt"
    load_into(model, hift_state(read_state(path)), path)
    return model.eval()
