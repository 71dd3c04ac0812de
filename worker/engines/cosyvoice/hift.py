"""HiFT vocoder: mel [B, 80, T] -> 24 kHz waveform via an F0 predictor, harmonic source and iSTFT.

Parameter names match the released `hift.pt`; weight-normalised layers are folded into plain
weights when loading (see weights.py), so the modules here hold ordinary convolutions. Every random
draw goes through a caller-owned `torch.Generator`, so a request's seed fixes its waveform.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import HiFTConfig


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class Snake(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_padding(kernel)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    def __init__(self, in_channels: int, cond_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [
                nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """Harmonic-plus-noise excitation from F0 [B, samples, 1] (the 24 kHz variant)."""

    def __init__(self, cfg: HiFTConfig, upsample_scale: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.upsample_scale = upsample_scale
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def draws(self, samples: int, generators: list[torch.Generator | None],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The excitation's random inputs, one stream per row (so a row's excitation is its
        own): initial harmonic phases [B, H] and noise [B, samples, H], in the released recipe's
        draw order and memory layout."""
        harmonics = self.cfg.nb_harmonics + 1
        initial = torch.cat([
            torch.rand(1, harmonics, device=_device(g), generator=g) for g in generators
        ]).to(device)
        initial[:, 0] = 0
        # The layout of the excitation's sines, [samples, harmonics] with samples contiguous:
        # the recipe's `randn_like` filled that layout.
        noise = torch.cat([
            torch.empty_strided((1, samples, harmonics), (samples * harmonics, 1, samples),
                                device=_device(g)).normal_(generator=g)
            for g in generators
        ]).to(device)
        return initial, noise

    def forward(self, f0: torch.Tensor, initial: torch.Tensor, noise: torch.Tensor
                ) -> torch.Tensor:
        cfg = self.cfg
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        fn = f0 * harmonics.view(1, 1, -1)
        rad = (fn / cfg.sampling_rate) % 1
        rad[:, 0, :] = rad[:, 0, :] + initial.to(fn.dtype)
        rad = F.interpolate(
            rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear"
        ).transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        phase = F.interpolate(
            phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale,
            mode="linear",
        ).transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0 > cfg.nsf_voiced_threshold).to(f0.dtype)
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        sines = sines * uv + noise_amp * noise
        return torch.tanh(self.l_linear(sines))


def _device(generator: torch.Generator | None) -> torch.device:
    """Where a row's noise is drawn: on its generator's device (a CPU generator reproduces the
    released recipe's draws; one on the GPU avoids drawing millions of numbers on the host)."""
    if generator is None:
        return torch.device("cpu")
    return generator.device


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.upsample_scale = int(np.prod(cfg.upsample_rates)) * cfg.hop_len
        self.m_source = SourceModule(cfg, self.upsample_scale)
        base = cfg.base_channels
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(
                zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)
            )
        )
        down_rates = [1, *list(cfg.upsample_rates[::-1][:-1])]
        cum = np.cumprod(down_rates)[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes,
                strict=True)
        ):
            out = base // 2 ** (i + 1)
            u = int(u)
            conv = (
                nn.Conv1d(cfg.n_fft + 2, out, 1)
                if u == 1
                else nn.Conv1d(cfg.n_fft + 2, out, u * 2, u, padding=u // 2)
            )
            self.source_downs.append(conv)
            self.source_resblocks.append(ResBlock(out, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        last = base // 2 ** len(cfg.upsample_rates)
        self.conv_post = nn.Conv1d(last, cfg.n_fft + 2, 7, padding=3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        self.window: torch.Tensor
        self.register_buffer(
            "window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False
        )
        self.dft: torch.Tensor
        self.idft: torch.Tensor
        forward, inverse = dft_bases(cfg.n_fft)
        self.register_buffer("dft", forward, persistent=False)
        self.register_buffer("idft", inverse, persistent=False)

    def source(self, mel: torch.Tensor, initial: torch.Tensor, noise: torch.Tensor
               ) -> torch.Tensor:
        """Excitation [B, 1, samples] for a mel [B, 80, T] from its random inputs (`draws`)."""
        f0 = self.f0_predictor(mel)
        f0_up = F.interpolate(f0[:, None], scale_factor=float(self.upsample_scale))
        return self.m_source(f0_up.transpose(1, 2), initial, noise).transpose(1, 2)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Waveform [B, samples] from a mel and its excitation."""
        cfg = self.cfg
        s = stft(source.squeeze(1), cfg.n_fft, cfg.hop_len, self.window, self.dft)
        x = self.conv_pre(mel)
        kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            acc = self.resblocks[i * kernels](x)
            for j in range(1, kernels):
                acc = acc + self.resblocks[i * kernels + j](x)
            x = acc / kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :bins]), max=1e2)
        phase = torch.sin(x[:, bins:])
        spectrum = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
        wav = inverse_stft(spectrum, cfg.n_fft, cfg.hop_len, self.window, self.idft)
        return torch.clamp(wav, -cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def forward(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform and the excitation used; `cache_source` overrides the excitation's start.

        `generator` is one random stream for every row, or a list with one per row.
        """
        mel = mel.float()
        generators = generator if isinstance(generator, list) else [generator] * mel.size(0)
        initial, noise = self.draws(mel, generators)
        return self.vocode(mel, cache_source, initial, noise)

    def draws(self, mel: torch.Tensor, generators: list[torch.Generator | None]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m_source.draws(mel.size(2) * self.upsample_scale, generators, mel.device)

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor, cache_source: torch.Tensor | None,
               initial: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from drawn random inputs: no host work, so it can replay as a graph."""
        mel = mel.float()
        source = self.source(mel, initial, noise)
        if cache_source is not None and cache_source.size(2) > 0:
            source[:, :, : cache_source.size(2)] = cache_source
        return self.decode(mel, source), source


def dft_bases(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real DFT of `n_fft` points as two float32 [n_fft, n_fft + 2] matrices: windowed
    frames @ forward = [real parts | imaginary parts] of bins 0..n_fft/2, and inverse @ [real
    parts; imaginary parts] = the frames (`torch.fft.irfft`'s weights folded in)."""
    bins = n_fft // 2 + 1
    n = torch.arange(n_fft, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(bins, dtype=torch.float64).unsqueeze(0)
    angle = 2 * math.pi * n * k / n_fft
    weight = torch.full((bins,), 2.0 / n_fft, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0 / n_fft
    forward = torch.cat([angle.cos(), -angle.sin()], dim=1)
    inverse = torch.cat([angle.cos() * weight, -angle.sin() * weight], dim=1)
    return forward.float(), inverse.float()


def stft(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor, forward: torch.Tensor
         ) -> torch.Tensor:
    """`torch.stft(x, n_fft, hop, n_fft, window)` (centred, reflect padding) for x [B, samples]
    as [B, real parts then imaginary parts, F], by a matrix product with `dft_bases`' forward:
    the vocoder's transforms are 16 points, and a CUDA graph holds a matrix product without the
    FFT library's plans."""
    half = n_fft // 2
    padded = F.pad(x.unsqueeze(1), (half, half), mode="reflect").squeeze(1)
    frames = padded.unfold(-1, n_fft, hop) * window  # [B, F, n_fft]
    return (frames @ forward).transpose(1, 2)


def inverse_stft(spectrum: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor,
                 inverse: torch.Tensor) -> torch.Tensor:
    """`torch.istft` (centred) of [B, real parts then imaginary parts, F], by a matrix product
    with `dft_bases`' inverse and an overlap-add, with none of the host synchronisation torch's
    version makes to check the window's overlap (so a CUDA graph can hold it)."""
    count = spectrum.size(2)
    frames = (inverse @ spectrum) * window.view(1, -1, 1)  # [B, n_fft, F]
    length = n_fft + hop * (count - 1)

    def overlap_add(x: torch.Tensor) -> torch.Tensor:
        return F.fold(x, (1, length), (1, n_fft), stride=(1, hop)).view(x.size(0), length)

    envelope = overlap_add(window.square().view(1, -1, 1).expand(1, -1, count))
    half = n_fft // 2
    return (overlap_add(frames) / envelope)[:, half : length - half]


def samples_per_frame(cfg: HiFTConfig) -> int:
    return int(math.prod(cfg.upsample_rates)) * cfg.hop_len
