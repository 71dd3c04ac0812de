"""Audio features the model was trained on, computed with torch alone.

- `prompt_mel`: the flow's 80-bin log-mel at 24 kHz (hop 480), as the training recipe computed it.
- `whisper_log_mel`: the speech tokenizer's 128-bin log-mel at 16 kHz (Whisper's recipe).
- `kaldi_fbank`: the speaker model's 80-bin Kaldi filterbank at 16 kHz.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from worker.engines.cosyvoice.config import MelConfig


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    log_region = freq >= min_log_hz
    log_mels = min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep
    return np.where(log_region, log_mels, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    log_region = mels >= min_log_mel
    return np.where(log_region, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@lru_cache(maxsize=8)
def slaney_mel_filters(
    sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None
) -> torch.Tensor:
    """[n_mels, n_fft//2+1] Slaney-style, area-normalised triangular filters (librosa's default)."""
    top = sr / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    low, high = _hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(top))
    mel_pts = _mel_to_hz(np.linspace(low, high, n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2 : n_mels + 2] - mel_pts[:n_mels]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def prompt_mel(wav: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Log-mel [frames, 80] of a mono waveform [samples] at `cfg.sampling_rate`."""
    pad = (cfg.n_fft - cfg.hop_size) // 2
    y = F.pad(wav.view(1, 1, -1), (pad, pad), mode="reflect").view(1, -1)
    spec = torch.stft(
        y, cfg.n_fft, hop_length=cfg.hop_size, win_length=cfg.win_size,
        window=torch.hann_window(cfg.win_size, device=wav.device), center=False,
        return_complex=True,
    )
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    filters = slaney_mel_filters(cfg.sampling_rate, cfg.n_fft, cfg.num_mels, cfg.fmin, cfg.fmax)
    mel = torch.matmul(filters.to(wav.device), mag)
    return torch.log(torch.clamp(mel, min=1e-5))[0].transpose(0, 1)


def whisper_log_mel(wav16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's normalised log-mel [n_mels, frames] of 16 kHz audio (n_fft 400, hop 160)."""
    n_fft = 400
    spec = torch.stft(
        wav16k, n_fft, 160, window=torch.hann_window(n_fft, device=wav16k.device),
        return_complex=True,
    )
    power = spec[..., :-1].abs() ** 2
    filters = slaney_mel_filters(16000, n_fft, n_mels, 0.0, None).to(wav16k.device)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def _kaldi_mel_banks(n_mels: int, n_fft: int, sr: int, low: float, high: float) -> torch.Tensor:
    def mel(f: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log(1.0 + f / 700.0)

    bins = n_fft // 2
    fft_bin_width = sr / n_fft
    mel_low = mel(torch.tensor(low))
    mel_high = mel(torch.tensor(high))
    delta = (mel_high - mel_low) / (n_mels + 1)
    b = torch.arange(n_mels, dtype=torch.float32).unsqueeze(1)
    left = mel_low + b * delta
    center = left + delta
    right = center + delta
    freqs = mel(fft_bin_width * torch.arange(bins, dtype=torch.float32)).unsqueeze(0)
    up = (freqs - left) / (center - left)
    down = (right - freqs) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1))


def kaldi_fbank(wav16k: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Kaldi `compute-fbank-feats` defaults [frames, n_mels]: 25 ms Povey windows every 10 ms.

    Expects samples scaled like 16-bit PCM would be after division by 32768 (i.e. [-1, 1]), as
    the speaker model's recipe fed them.
    """
    sr = 16000
    frame, shift = 400, 160
    n_fft = 512
    if wav16k.numel() < frame:
        raise ValueError("audio shorter than one analysis frame")
    frames = wav16k.unfold(0, frame, shift).double()
    frames = frames - frames.mean(dim=1, keepdim=True)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev
    window = torch.hann_window(frame, periodic=False, dtype=torch.float64).pow(0.85)
    frames = F.pad(frames * window, (0, n_fft - frame))
    power = torch.fft.rfft(frames).abs().pow(2)
    banks = _kaldi_mel_banks(n_mels, n_fft, sr, 20.0, sr / 2).double()
    energies = power @ banks.T
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(energies, min=eps)).float()
