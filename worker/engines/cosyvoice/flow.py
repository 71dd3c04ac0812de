"""Speech tokens -> mel frames: token embedding, upsampling encoder, conditional flow matching.

Parameter names match the released `flow.pt`. `FlowModel.stream_batch` is the stage the
scheduler calls on the next chunks of many requests at once: it computes only their new frames,
from the state each request keeps (`flow_state`). `mel_batch` recomputes a whole utterance, as
upstream does at every chunk; the parity tests hold the two to each other and to upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.config import FlowConfig
from worker.engines.cosyvoice.encoder_graphs import EncoderGraphs
from worker.engines.cosyvoice.flow_decoder import Estimator, EulerSolver
from worker.engines.cosyvoice.flow_encoder import UpsampleEncoder, attention_mask
from worker.engines.cosyvoice.flow_graphs import SolverGraphs
from worker.engines.cosyvoice.flow_state import (
    CallPages,
    FlowPages,
    FlowState,
    SolverHistory,
    incremental_mask,
)
from worker.engines.cosyvoice.transfer import to_device

NOISE_FRAMES = 50 * 300
"""The released model starts every utterance from the same noise: N(0, 1) drawn with seed 0."""


EAGER_ROWS = 8
"""Rows per solver call that no graph fits."""

DEFAULT_PAGES = 64
"""Pages of the flow states' store when no engine sized it (it grows while not fixed)."""


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
        self.encoder_graphs: EncoderGraphs | None = None
        """Set (and captured) by the engine on a GPU: the token encoder as graphs."""
        self.solver_graphs: SolverGraphs | None = None
        """Set (and captured) by the engine on a GPU: the streamed Euler loop as graphs, for
        small batches."""
        self.pages: FlowPages | None = None
        """The streams' states (`flow_state.py`): set by the engine, sized to its capacity, or
        made on the first streamed call."""

    def flow_pages(self, steps: int, pages: int = DEFAULT_PAGES) -> FlowPages:
        """The store of the streams' states for `steps` Euler steps (made with `pages` pages
        if there is none yet)."""
        if self.pages is None:
            estimator = self.decoder.estimator
            weight = self.input_embedding.weight
            self.pages = FlowPages(steps, estimator.attention_blocks, estimator.cfg.channels[0],
                                   self.cfg.estimator.static_chunk_size, pages, weight.device,
                                   self.spk_embed_affine_layer.weight.dtype)
        if self.pages.steps != steps:
            raise ValueError(f"the flow's states are kept for {self.pages.steps} steps, "
                             f"not {steps}")
        return self.pages

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

    def encode_tokens(self, token_ids: torch.Tensor, present: torch.Tensor, valid: torch.Tensor,
                      streaming: torch.Tensor) -> torch.Tensor:
        """Encoder features [B, 2W, C] for token ids [B, W + look] (see `UpsampleEncoder`)."""
        h, _ = self.encoder(self.input_embedding(token_ids), present, valid, streaming)
        projected: torch.Tensor = self.encoder_proj(h)
        return projected

    def _encode(self, rows: list[FlowRow], streaming: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Encoder output [B, C, T] over each row's prompt and tokens, its [B, T] validity, the
        speaker rows [B, C] and each row's frame count (look-ahead tokens make none)."""
        device = self.input_embedding.weight.device
        dtype = self.spk_embed_affine_layer.weight.dtype
        look = self.cfg.pre_lookahead_len
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
        inputs = (to_device(token_ids, device), to_device(present, device),
                  to_device(valid, device), streaming)
        h = None
        if self.encoder_graphs is not None:
            h = self.encoder_graphs.run(*inputs)
        if h is None:
            h = self.encode_tokens(*inputs)
        h_valid = inputs[2].repeat_interleave(self.encoder.cfg.upsample_stride, dim=1)
        embeddings = to_device(torch.stack([r.embedding.cpu() for r in rows]), device).to(dtype)
        spks = self.spk_embed_affine_layer(F.normalize(embeddings, dim=1))
        ratio = self.cfg.token_mel_ratio
        return h.transpose(1, 2), h_valid, spks, [n * ratio for n in frames_in]

    @torch.inference_mode()
    def mel_batch(self, rows: list[FlowRow], steps: int = 10) -> list[torch.Tensor]:
        """New mel frames [80, frames] after each row's prompt, recomputed over the whole
        utterance so far, for rows of any lengths at once.

        Rows are padded on the right to the longest and masked: every layer is causal or masked
        over padding, so a row's frames are what it would get alone, up to rounding.
        """
        device = self.input_embedding.weight.device
        streaming = torch.tensor([r.streaming for r in rows], device=device)
        mu, valid, spks, frames = self._encode(rows, streaming)
        b, _, total = mu.shape
        cond = torch.zeros(b, self.cfg.output_size, total, device=device, dtype=mu.dtype)
        for i, r in enumerate(rows):
            cond[i, :, : r.prompt_mel.size(0)] = r.prompt_mel.to(device, mu.dtype).T
        allowed = attention_mask(valid, self.cfg.estimator.static_chunk_size, streaming)
        noise = self.noise[:, :, :total].to(mu.dtype).expand(b, -1, -1)
        feat = self.solver.solve(noise, valid.unsqueeze(1).to(mu.dtype), mu, spks, cond,
                                 additive(allowed, mu.dtype), steps)
        return [feat[i, :, r.prompt_mel.size(0) : n] for i, (r, n) in enumerate(zip(rows, frames,
                                                                                   strict=True))]

    @torch.inference_mode()
    def stream_batch(
        self, rows: list[FlowRow], states: list[FlowState | None], steps: int = 10,
        emitted: list[int] | None = None,
    ) -> tuple[list[torch.Tensor], list[FlowState]]:
        """The next chunk of each row's streamed (chunk-causal) mel, computing only what its
        state does not hold: mel [80, frames] after the prompt and after the row's `emitted`
        frames (default: all its state holds), and each row's state to pass with its next chunk
        (None before the first).

        A state holds frames up to the last boundary of the 50-frame attention grid: a chunk
        that ends between two (a short first chunk) leaves its last frames to be computed again
        with the next chunk, which they see. Equal, up to rounding, to `mel_batch` with
        `streaming` over the same tokens, sliced to the frames after `emitted`.

        The rows are solved in one call or several (`_solver_calls`).
        """
        device = self.input_embedding.weight.device
        mu_all, _, spks, frames = self._encode(rows, torch.ones(len(rows), dtype=torch.bool,
                                                                device=device))
        prompt_frames = [r.prompt_mel.size(0) for r in rows]
        if emitted is None:
            emitted = [max(0, (0 if s is None else s.frames) - pf)
                       for s, pf in zip(states, prompt_frames, strict=True)]
        start = [pf + e for pf, e in zip(prompt_frames, emitted, strict=True)]
        states = self._off_graphs_from_none(states, frames, steps)
        return self._stream_encoded(rows, mu_all, spks, frames, states, start, steps)

    def _off_graphs_from_none(self, states: list[FlowState | None], frames: list[int],
                              steps: int) -> list[FlowState | None]:
        """Rows that would start from a prompt's state that no graph fits, but that fit one from
        no state, start from none: the same frames, from a graph rather than eagerly. (A prompt
        one or two tokens past the grid leaves two chunks to its first one: 150 new frames.)"""
        graphs = self.solver_graphs
        if graphs is None:
            return states
        return [None if s is not None and s.shared
                and graphs.bucket_for(1, f - s.frames, s.frames, steps) is None
                and graphs.bucket_for(1, f, 0, steps) is not None else s
                for s, f in zip(states, frames, strict=True)]

    @torch.inference_mode()
    def prompt_states(self, rows: list[FlowRow], steps: int = 10) -> list[FlowState | None]:
        """Each row's state over the frames of its prompt that no speech token can change, to
        start its first chunk from: the prompt's whole 50-frame chunks before the one that its
        last tokens' look-ahead reaches out of (the encoder and estimator are chunk-causal, and
        the noise is fixed). A first chunk from it computes the rest of the prompt and its own
        frames only, and gets the same frames as from no state. None where the prompt holds no
        such chunk (`rows`' tokens are ignored)."""
        grid = self.cfg.estimator.static_chunk_size
        look = self.cfg.pre_lookahead_len
        ratio = self.cfg.token_mel_ratio
        prompts = [FlowRow(r.tokens[:0], r.prompt_tokens, r.prompt_mel, r.embedding, False, True)
                   for r in rows]
        held = [i for i, r in enumerate(prompts)
                if grid > 0 and (r.prompt_tokens.numel() - look) * ratio >= grid]
        states: list[FlowState | None] = [None] * len(rows)
        if not held:
            return states
        device = self.input_embedding.weight.device
        held_rows = [prompts[i] for i in held]
        mu_all, _, spks, frames = self._encode(held_rows, torch.ones(len(held), dtype=torch.bool,
                                                                     device=device))
        _, made = self._stream_encoded(held_rows, mu_all, spks, frames, [None] * len(held),
                                       [0] * len(held), steps)
        for i, state in zip(held, made, strict=True):
            states[i] = state.to_share()
        return states

    def _stream_encoded(
        self, rows: list[FlowRow], mu_all: torch.Tensor, spks: torch.Tensor, frames: list[int],
        states: list[FlowState | None], start: list[int], steps: int,
    ) -> tuple[list[torch.Tensor], list[FlowState]]:
        """`stream_batch` for rows already encoded, with mels from frame `start` of each."""
        device = mu_all.device
        results: dict[int, tuple[torch.Tensor, FlowState]] = {}
        for group in self._solver_calls(states, frames, steps):
            index = to_device(torch.tensor(group), device)
            group_mels, group_states = self._stream_group(
                [rows[i] for i in group], mu_all.index_select(0, index),
                spks.index_select(0, index), [frames[i] for i in group],
                [states[i] for i in group], [start[i] for i in group], steps)
            results.update(zip(group, zip(group_mels, group_states, strict=True), strict=True))
        return ([results[i][0] for i in range(len(rows))],
                [results[i][1] for i in range(len(rows))])

    def _solver_calls(self, states: list[FlowState | None], frames: list[int], steps: int
                      ) -> list[list[int]]:
        """The rows of a streamed chunk, split into solver calls.

        First chunks (no state: the prompt and many new frames) and chunks after earlier frames
        (later chunks of one hop or two, first chunks from a prompt's state) are solved apart:
        each kind has its own graphs, and a call that mixed them would fit neither. With graphs,
        each kind is cut, in order of earlier frames (so a call pads little), into calls that fit
        a captured bucket (rows of one hop share a call with rows of two, padded to the wider
        width: one call costs less than two); rows that fit none (a long prompt, a long
        utterance) go in eager calls of at most `EAGER_ROWS`, which bounds the history buffers an
        eager call allocates.
        """
        past = [0 if s is None else s.frames for s in states]
        new = [f - p for f, p in zip(frames, past, strict=True)]
        graphs = self.solver_graphs
        kinds: dict[bool, list[int]] = {}
        for i, s in enumerate(states):
            kinds.setdefault(s is None, []).append(i)
        calls: list[list[int]] = []
        for key in sorted(kinds, reverse=True):
            kind = sorted(kinds[key], key=lambda i: (past[i], new[i]))
            if graphs is None:
                calls.append(kind)
                continue
            current: list[int] = []
            eager: list[int] = []
            for i in kind:
                if graphs.bucket_for(1, new[i], past[i], steps) is None:
                    eager.append(i)
                    continue
                widened = [*current, i]
                if graphs.bucket_for(len(widened), max(new[j] for j in widened),
                                     max(past[j] for j in widened), steps) is None:
                    calls.append(current)
                    widened = [i]
                current = widened
            calls.append(current)
            calls += [eager[k : k + EAGER_ROWS] for k in range(0, len(eager), EAGER_ROWS)]
        return [call for call in calls if call]

    def _stream_group(
        self, rows: list[FlowRow], mu_all: torch.Tensor, spks: torch.Tensor, frames: list[int],
        states: list[FlowState | None], start: list[int], steps: int,
    ) -> tuple[list[torch.Tensor], list[FlowState]]:
        """One solver call of `_stream_encoded` (`mu_all` [B, C, T], `frames` each)."""
        device = mu_all.device
        dtype = mu_all.dtype
        grid = self.cfg.estimator.static_chunk_size
        past = [0 if s is None else s.frames for s in states]
        new = [f - p for f, p in zip(frames, past, strict=True)]
        if any(s >= f or s < p for s, f, p in zip(start, frames, past, strict=True)):
            raise ValueError("a chunk must add frames after those its state holds")
        if grid > 0 and any(p % grid for p in past):  # its last page would be shared, or full
            raise ValueError("a stream continues only from a line of the attention grid")
        kept = [(f // grid) * grid - p if grid > 0 else n
                for f, p, n in zip(frames, past, new, strict=True)]
        b, channels, total = mu_all.shape
        width_new = max(new)
        positions = to_device((torch.tensor(past).unsqueeze(1) + torch.arange(width_new)).clamp(
            max=total - 1), device)
        mu = mu_all.gather(2, positions.unsqueeze(1).expand(-1, channels, -1))
        noise = self.noise[0].to(dtype)[:, positions].permute(1, 0, 2)
        prompts = [r.prompt_mel[p : p + n] for r, p, n in zip(rows, past, new, strict=True)]
        if any(prompt.numel() for prompt in prompts):  # first chunks: the prompt's last frames
            cond = torch.zeros(b, channels, width_new)
            for i, prompt in enumerate(prompts):
                cond[i, :, : prompt.size(0)] = prompt.cpu().T
            cond = to_device(cond, device).to(dtype)
        else:
            cond = torch.zeros(b, channels, width_new, device=device, dtype=dtype)
        counts = to_device(torch.tensor([past, new, kept]), device)
        new_frames = counts[1]
        mask = (torch.arange(width_new, device=device) < new_frames.unsqueeze(1)).unsqueeze(1)
        store = self.flow_pages(steps)
        page = store.page_frames
        taken: list[int] = []
        try:
            row_pages = []
            for state, p, n in zip(states, past, new, strict=True):
                own = () if state is None else state.pages
                extra = store.take(-(-(p + n) // page) - len(own))
                taken += extra
                row_pages.append((*own, *extra))
            feat, tails = self._solve_incremental(
                noise, mask.to(dtype), mu, spks, cond, counts[0], new_frames, counts[2], states,
                grid, steps, CallPages(store, row_pages, past, new))
            mels = [feat[i, :, s - p : n]
                    for i, (s, p, n) in enumerate(zip(start, past, new, strict=True))]
            updated = [store.state(p + k, pages[: -(-(p + k) // page)], tails[:, :, :, i].clone())
                       for i, (p, k, pages) in enumerate(zip(past, kept, row_pages, strict=True))]
        finally:
            store.release(taken)
        return mels, updated

    def _solve_incremental(
        self, noise: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
        cond: torch.Tensor, past_frames: torch.Tensor, new_frames: torch.Tensor,
        kept_frames: torch.Tensor, states: list[FlowState | None], chunk: int, steps: int,
        pages: CallPages,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The solver over each row's new frames, recorded in the rows' `pages`, and the
        convolution tails [steps, convs, 2, B, C_max, 2], taken where each row's kept frames
        end."""
        width_past = max((s.frames for s in states if s is not None), default=0)
        b, _, width_new = noise.shape
        allowed = incremental_mask(past_frames, new_frames, width_past, width_new, chunk)
        bias = additive(allowed, noise.dtype)
        if self.solver_graphs is not None:
            solved = self.solver_graphs.solve(noise, mask, mu, spks, cond, bias, states,
                                              kept_frames, steps, pages)
            if solved is not None:
                return solved
        history = self.new_history(pages.store.flat(), b, width_past, width_new)
        history.load(states, kept_frames, pages.slots(b, width_past, width_new))
        feat = self.solver.solve(noise, mask, mu, spks, cond, bias, steps, history)
        return feat, history.tails_out

    def new_history(self, store: torch.Tensor, rows: int, width_past: int, width_new: int
                    ) -> SolverHistory:
        """History buffers over `store` (`FlowPages.flat`) for `rows` rows of `width_new` new
        frames after `width_past` (slots and tails zero until loaded)."""
        estimator = self.decoder.estimator
        convs = estimator.convolutions
        steps = store.size(0)

        def zeros(*shape: int, dtype: torch.dtype = store.dtype) -> torch.Tensor:
            return torch.zeros(*shape, device=store.device, dtype=dtype)

        return SolverHistory(
            store=store,
            write_slots=zeros(rows * width_new, dtype=torch.long),
            read_slots=zeros(rows * (width_past + width_new), dtype=torch.long),
            tails=zeros(steps, len(convs), 2, rows, max(convs), 2),
            tail_index=zeros(2 * rows, 1, 2, dtype=torch.long),
            tails_out=zeros(steps, len(convs), 2, rows, max(convs), 2),
        )


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention bias from a boolean mask: 0 where allowed, -1e10 elsewhere."""
    return (1.0 - allowed.to(dtype)) * -1.0e10


@dataclass(frozen=True)
class FlowRow:
    """One request's flow input: every token so far (look-ahead included unless `finalize`)."""

    tokens: torch.Tensor
    prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    embedding: torch.Tensor
    finalize: bool
    streaming: bool
