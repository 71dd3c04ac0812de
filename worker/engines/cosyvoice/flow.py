"""Speech tokens -> mel frames: token embedding, upsampling encoder, conditional flow matching.

Parameter names match the released `flow.pt`. `FlowModel.mel` is the stage a scheduler calls on a
batch of requests; it returns only the new frames after each request's prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import FlowConfig
from worker.engines.cosyvoice.flow_decoder import Estimator, EulerSolver
from worker.engines.cosyvoice.flow_encoder import UpsampleEncoder

NOISE_FRAMES = 50 * 300
"""The released model starts every utterance from the same noise: N(0, 1) drawn with seed 0."""


def fixed_noise(channels: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn([1, channels, NOISE_FRAMES], generator=generator)


class _Decoder(nn.Module):
    def __init__(self, estimator: Estimator) -> None:
        super().__init__()
        self.estimator = estimator


class FlowModel(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleEncoder(cfg.encoder, cfg.pre_lookahead_len)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = _Decoder(Estimator(cfg.estimator))
        self.solver = EulerSolver(self.decoder.estimator, cfg.inference_cfg_rate, cfg.t_scheduler)
        self.noise: torch.Tensor
        self.register_buffer("noise", fixed_noise(cfg.output_size), persistent=False)

    @torch.inference_mode()
    def mel(
        self,
        tokens: torch.Tensor,
        prompt_tokens: torch.Tensor,
        prompt_mel: torch.Tensor,
        embedding: torch.Tensor,
        finalize: bool,
        streaming: bool,
        steps: int = 10,
    ) -> torch.Tensor:
        """Mel [B, 80, frames] for `tokens` [B, T] after `prompt_tokens` [B, P].

        `prompt_mel` is [B, 2P, 80]. Unless `finalize`, the last `pre_lookahead_len` tokens are
        look-ahead context only and produce no frames. Requests in one batch share T and P.
        """
        dtype = self.spk_embed_affine_layer.weight.dtype
        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(dtype), dim=1))
        all_tokens = torch.cat([prompt_tokens, tokens], dim=1).long().clamp(min=0)
        xs = self.input_embedding(all_tokens)
        context = None
        if not finalize:
            look = self.cfg.pre_lookahead_len
            xs, context = xs[:, :-look], xs[:, -look:]
        valid = torch.ones(xs.shape[:2], dtype=torch.bool, device=xs.device)
        h, h_valid = self.encoder(xs, valid, context=context, streaming=streaming)
        h = self.encoder_proj(h)
        prompt_frames = prompt_mel.size(1)
        total = h.size(1)
        cond = torch.zeros(h.size(0), total, self.cfg.output_size, device=h.device, dtype=h.dtype)
        cond[:, :prompt_frames] = prompt_mel.to(h.dtype)
        mask = h_valid.unsqueeze(1).to(h.dtype)
        noise = self.noise[:, :, :total].to(h.dtype).expand(h.size(0), -1, -1)
        feat = self.solver.solve(
            noise, mask, h.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2), steps,
            streaming,
        )
        return feat[:, :, prompt_frames:]
