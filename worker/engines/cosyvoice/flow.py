"""Speech tokens -> mel frames: token embedding, upsampling encoder, conditional flow matching.

Parameter names match the released `flow.pt`. `FlowModel.mel_batch` is the stage the scheduler
calls on the chunks of many requests at once; it returns only the new frames after each
request's prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import FlowConfig
from worker.engines.cosyvoice.flow_decoder import Estimator, EulerSolver
from worker.engines.cosyvoice.flow_encoder import UpsampleEncoder
from worker.engines.cosyvoice.flow_graphs import SolverGraphs

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
        self.solver_graphs: SolverGraphs | None = None
        """Set (and captured) by the engine on a GPU: the Euler loop as graphs, small batches."""

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
        """Mel [1, 80, frames] for one request: `tokens` [1, T] after `prompt_tokens` [1, P].

        `prompt_mel` is [1, 2P, 80]. Unless `finalize`, the last `pre_lookahead_len` tokens are
        look-ahead context only and produce no frames.
        """
        row = FlowRow(tokens[0], prompt_tokens[0], prompt_mel[0], embedding[0], finalize,
                      streaming)
        return self.mel_batch([row], steps)[0].unsqueeze(0)

    @torch.inference_mode()
    def mel_batch(self, rows: list[FlowRow], steps: int = 10) -> list[torch.Tensor]:
        """New mel frames [80, frames] after each row's prompt, for rows of any lengths at once.

        Rows are padded on the right to the longest and masked: every layer is causal or masked
        over padding, so a row's frames are what it would get alone, up to rounding.
        """
        device = self.input_embedding.weight.device
        dtype = self.spk_embed_affine_layer.weight.dtype
        look = self.cfg.pre_lookahead_len
        ratio = self.cfg.token_mel_ratio
        lengths = [r.prompt_tokens.numel() + r.tokens.numel() for r in rows]
        frames_in = [n if r.finalize else n - look for n, r in zip(lengths, rows, strict=True)]
        width = max(frames_in)
        b = len(rows)
        token_ids = torch.zeros(b, width + look, dtype=torch.long)
        present = torch.zeros(b, width + look, dtype=torch.bool)
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            token_ids[i, :n] = torch.cat([r.prompt_tokens.long(), r.tokens.long()]).clamp(min=0)
            present[i, :n] = True
        valid = torch.arange(width).unsqueeze(0) < torch.tensor(frames_in).unsqueeze(1)
        streaming = torch.tensor([r.streaming for r in rows], device=device)
        xs = self.input_embedding(token_ids.to(device))
        h, h_valid = self.encoder(xs, present.to(device), valid.to(device), streaming)
        h = self.encoder_proj(h)
        total = h.size(1)
        cond = torch.zeros(b, total, self.cfg.output_size, device=device, dtype=h.dtype)
        for i, r in enumerate(rows):
            cond[i, : r.prompt_mel.size(0)] = r.prompt_mel.to(device, h.dtype)
        embeddings = torch.stack([r.embedding for r in rows]).to(device, dtype)
        spks = self.spk_embed_affine_layer(F.normalize(embeddings, dim=1))
        mask = h_valid.unsqueeze(1).to(h.dtype)
        noise = self.noise[:, :, :total].to(h.dtype).expand(b, -1, -1)
        inputs = (noise, mask, h.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2),
                  streaming)
        feat = None
        if self.solver_graphs is not None:
            feat = self.solver_graphs.solve(*inputs, steps)
        if feat is None:
            feat = self.solver.solve(*inputs, steps)
        return [
            feat[i, :, r.prompt_mel.size(0) : n * ratio]
            for i, (r, n) in enumerate(zip(rows, frames_in, strict=True))
        ]


@dataclass(frozen=True)
class FlowRow:
    """One request's flow input: every token so far (look-ahead included unless `finalize`)."""

    tokens: torch.Tensor
    prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    embedding: torch.Tensor
    finalize: bool
    streaming: bool
