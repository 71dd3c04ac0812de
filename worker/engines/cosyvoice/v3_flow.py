"""The CosyVoice3 flow: speech tokens to mel frames, whole or incrementally, many requests at once.

Names follow the released `flow.pt`: `input_embedding` (tokens to 80 dims),
`spk_embed_affine_layer`, `pre_lookahead_layer` (a kernel-4 convolution over each token and the
3 after it, then a causal kernel-3 one, plus the input) and the DiT under `decoder.estimator`.
Each token becomes `token_mel_ratio` frames; a 10-step Euler solver with cosine schedule
integrates the estimator's velocity from fixed noise (guided and unguided passes: one batch of 2B).

Incremental streaming: a `FlowStream` per request keeps, for every Euler step, the keys and values
of its frames at every layer (in pages of the flow's store, `flow_state.FlowPages`, which the
estimator reads and writes in place) and the tails of the position convolutions, so `advance`
computes only new frames. Attention is chunk-causal on a `static_chunk_size` grid counted from
the first prompt frame, so frames before the last grid line never change and are kept; frames
after it (a call that ends off the grid) are returned but computed again, with what follows, by
the next call, exactly as a recompute-everything stream would see them. The noise is a fixed buffer
indexed by a frame's position in its utterance (prompt included), drawn once from seed 0 as the
released recipe draws it, so requests share no state.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.flow_state import FlowPages, FlowState, PagedFrames, paged_slots
from worker.engines.cosyvoice.transfer import to_device
from worker.engines.cosyvoice.v3_config import V3FlowConfig
from worker.engines.cosyvoice.v3_dit import POS_KERNEL, DiT, StepCache
from worker.engines.cosyvoice.v3_flow_graphs import DiTStepGraphs
from worker.engines.cosyvoice.weights import load_into, read_state

STEPS = 10
NOISE_FRAMES = 50 * 300
NOISE_SEED = 0
DEFAULT_PAGES = 64
"""Pages of the flow's store when no engine sized it (it grows while not fixed)."""


def fixed_noise(channels: int = 80, frames: int = NOISE_FRAMES) -> torch.Tensor:
    """[frames, channels]: the solver's start, `randn(1, 80, 15000)` right after seed 0."""
    gen = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn(1, channels, frames, generator=gen)[0].T.contiguous()


class PreLookahead(nn.Module):
    def __init__(self, channels: int, hidden: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, hidden, lookahead + 1)
        self.conv2 = nn.Conv1d(hidden, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L + lookahead, C] -> [B, L, C]: features of the first L tokens (the last
        `lookahead` inputs are context only; pass zeros there at the end of an utterance)."""
        h = F.leaky_relu(self.conv1(x.transpose(1, 2)))
        h = self.conv2(F.pad(h, (2, 0))).transpose(1, 2)
        return h + x[:, : h.size(1)]


class _Decoder(nn.Module):
    def __init__(self, cfg: V3FlowConfig) -> None:
        super().__init__()
        self.estimator = DiT(cfg.dit)


def step_pages(pages: tuple[int, ...], step: int) -> tuple[int, ...]:
    """The pages of Euler step `step` among a state's `pages` (each step's in turn, as many
    for every step)."""
    per_step = len(pages) // STEPS
    return pages[step * per_step: (step + 1) * per_step]


@dataclass(eq=False)
class FlowStream:
    """One request's flow state: `state` (None until a call keeps frames) is the estimator's
    view of its first `frames` mel frames: every Euler step's keys and values at every layer,
    in pages of the flow's store (`step_pages`; each layer's keys are block 2 * layer, its values
    2 * layer + 1), and the position convolutions' tails [steps, 2 convs, 2 (guided, unguided),
    dim, 30]. A call replaces the state, never writes into it: its new frames go to pages of
    their own. `tokens` are all tokens received (prompt first), on the host: a call's token
    ids go to the device as one batch."""

    tokens: torch.Tensor
    prompt_mel: torch.Tensor
    speaker: torch.Tensor
    done_tokens: int = 0
    state: FlowState | None = None
    emitted: int = 0
    """Frames returned so far (prompt included), at or past `frames`."""
    finished: bool = False

    @property
    def frames(self) -> int:
        return 0 if self.state is None else self.state.frames

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes


class CosyVoice3Flow(nn.Module):
    def __init__(self, cfg: V3FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.pre_lookahead_layer = PreLookahead(
            cfg.input_size, cfg.lookahead_channels, cfg.pre_lookahead_len)
        self.decoder = _Decoder(cfg)
        self.noise: torch.Tensor
        self.register_buffer("noise", fixed_noise(cfg.output_size), persistent=False)
        self.step_graphs: DiTStepGraphs | None = None
        """Per-step graphs of the streamed estimator (set by the engine on a GPU)."""
        self.pages: FlowPages | None = None
        """The streams' keys and values (`flow_pages`): set by the engine, sized to its
        capacity, or made on the first streamed call."""

    @property
    def estimator(self) -> DiT:
        return self.decoder.estimator

    def flow_pages(self, pages: int = DEFAULT_PAGES) -> FlowPages:
        """The store of the streams' keys and values, in pages of one chunk of the attention
        grid for one Euler step (made with `pages` pages if there is none yet)."""
        if self.pages is None:
            dit = self.cfg.dit
            weight = self.input_embedding.weight
            self.pages = FlowPages(1, 2 * dit.depth, dit.heads * dit.dim_head,
                                   dit.static_chunk_size, pages, weight.device, weight.dtype)
        return self.pages

    def tails_like(self) -> torch.Tensor:
        """Zero position-convolution tails of a state: [steps, 2 convs, 2, dim, 30]."""
        return self.input_embedding.weight.new_zeros(STEPS, 2, 2, self.cfg.dit.dim,
                                                     POS_KERNEL - 1)

    def start(
        self, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor, embedding: torch.Tensor
    ) -> FlowStream:
        """A new request: prompt tokens [P], their mel [ratio * P, 80], speaker embedding [192]."""
        ratio = self.cfg.token_mel_ratio
        if prompt_mel.size(0) != ratio * prompt_tokens.numel():
            raise ValueError(f"prompt mel has {prompt_mel.size(0)} frames, "
                             f"expected {ratio} per prompt token ({prompt_tokens.numel()})")
        w = self.input_embedding.weight
        speaker = self.spk_embed_affine_layer(F.normalize(embedding.view(1, -1).to(w), dim=1))
        return FlowStream(prompt_tokens.long().cpu().view(-1), prompt_mel.to(w), speaker[0])

    def prefix_frames(self, prompt_tokens: int) -> int:
        """Frames of a prompt of this many tokens that depend on the prompt alone: those of its
        tokens before the last `pre_lookahead_len` (whose features read the request's first
        tokens), down to a chunk line (a frame sees every frame up to its chunk's end)."""
        chunk = self.cfg.dit.static_chunk_size
        free = (prompt_tokens - self.cfg.pre_lookahead_len) * self.cfg.token_mel_ratio
        return max(0, free // chunk * chunk)

    @torch.inference_mode()
    def solve_prefixes(self, streams: list[FlowStream]) -> list[FlowState | None]:
        """Advance new streams over their prompts' prefixes (`prefix_frames`), in one batch,
        and return each prefix's state, to share (None where the prompt is too short to have
        one): its pages are held by every stream that starts from it."""
        if any(s.frames for s in streams):
            raise ValueError("a prompt's prefix is solved on a new stream")
        ratio = self.cfg.token_mel_ratio
        ends = [self.prefix_frames(s.tokens.numel()) for s in streams]
        rows = [i for i, end in enumerate(ends) if end > 0]
        if rows:
            chosen = [streams[i] for i in rows]
            self._solve(chosen, [ends[i] // ratio for i in rows], [False] * len(rows), True)
        prefixes: list[FlowState | None] = [None] * len(streams)
        for i in rows:
            state = streams[i].state
            assert state is not None
            prefixes[i] = state.to_share()
        return prefixes

    def seed(self, stream: FlowStream, prefix: FlowState) -> None:
        """Start a new stream from its prompt's prefix, as if it had solved it itself: it
        reads the prefix's pages and writes pages of its own."""
        if stream.frames:
            raise ValueError("a prompt's prefix seeds a new stream")
        stream.state = prefix
        stream.emitted = prefix.frames
        stream.done_tokens = prefix.frames // self.cfg.token_mel_ratio

    def _features(self, streams: list[FlowStream], ends: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Token features of each stream's tokens [done, end) at the mel rate, for all streams
        in one pass: [B, N, 80] (zeros past a row's frames), its [B, N] validity and each row's
        frame count. A row's inputs reach none of another's: both convolutions are local."""
        look, ratio = self.cfg.pre_lookahead_len, self.cfg.token_mel_ratio
        # From two tokens before the first new one: the causal second convolution's context.
        firsts = [max(s.done_tokens - 2, 0) for s in streams]
        width = max(end + look - first for end, first in zip(ends, firsts, strict=True))
        ids = torch.zeros(len(streams), width, dtype=torch.long)
        present = torch.zeros(len(streams), width, dtype=torch.bool)
        for i, (stream, first, end) in enumerate(zip(streams, firsts, ends, strict=True)):
            row = stream.tokens[first: end + look]  # shorter at a final call: zeros after it
            ids[i, : row.numel()] = row
            present[i, : row.numel()] = True
        counts = [ratio * (end - s.done_tokens) for s, end in zip(streams, ends, strict=True)]
        frames = torch.arange(max(counts)).view(1, -1)
        valid = frames < torch.tensor(counts).view(-1, 1)
        # Frame f of row i is the feature of its token done + f // ratio.
        index = (torch.tensor([s.done_tokens - f for s, f in zip(streams, firsts, strict=True)])
                 .view(-1, 1) + torch.where(valid, frames, 0) // ratio)
        weight = self.input_embedding.weight
        ids, present, index, valid = (to_device(t, weight.device)
                                      for t in (ids, present, index, valid))
        x = self.input_embedding(ids.clamp(min=0)) * present.unsqueeze(-1).to(weight.dtype)
        h = self.pre_lookahead_layer(x)
        mu = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        return mu * valid.unsqueeze(-1).to(mu.dtype), valid, counts

    @staticmethod
    def _step_tails(new_tails: list[torch.Tensor], rows: int, unguided: int) -> torch.Tensor:
        """A step's new position-convolution tails as [2 convs, 2 (guided, unguided), rows, D,
        30] (a copy: graph outputs change at the next replay); each stream's unguided row sits
        `unguided` rows after its guided one."""
        tails = torch.stack(new_tails).view(len(new_tails), 2, unguided, *new_tails[0].shape[1:])
        return tails[:, :, :rows]

    def _prepare(
        self, s: FlowStream, tokens: torch.Tensor, final: bool, streaming: bool
    ) -> int:
        """Append `tokens` to the stream and return the token its frames end at."""
        if s.finished:
            raise ValueError("this request's flow has already finished")
        if not streaming and s.frames:
            raise ValueError("a non-streaming pass is one call on a new request")
        total = s.tokens.numel() + tokens.numel()
        end = total if final else total - self.cfg.pre_lookahead_len
        if end * self.cfg.token_mel_ratio <= max(s.emitted, s.prompt_mel.size(0)):
            raise ValueError("a call must bring at least one new token past the look-ahead")
        s.tokens = torch.cat([s.tokens, tokens.long().cpu().view(-1)])
        return end

    @torch.inference_mode()
    def advance(
        self, streams: list[FlowStream], new_tokens: list[torch.Tensor], final: list[bool],
    ) -> list[torch.Tensor]:
        """Append tokens to each request and return its new mel frames [80, n] (prompt frames
        excluded). A non-final call holds back the last `pre_lookahead_len` tokens as
        look-ahead; the frames it computes are those after the last grid line it kept.

        First chunks (the prompt, or what its prefix left of it, and the chunk: nothing
        returned yet) and later chunks (a chunk after many earlier frames) are solved apart: in
        one call every later chunk would be padded to a first chunk's frames, and every first
        chunk to the longest history."""
        first = [i for i, s in enumerate(streams) if s.emitted <= s.prompt_mel.size(0)]
        later = [i for i, s in enumerate(streams) if s.emitted > s.prompt_mel.size(0)]
        ends = [self._prepare(s, tok, fin, True)
                for s, tok, fin in zip(streams, new_tokens, final, strict=True)]
        mels: dict[int, torch.Tensor] = {}
        for group in (g for g in (first, later) if g):
            mels.update(zip(group, self._solve([streams[i] for i in group],
                                               [ends[i] for i in group],
                                               [final[i] for i in group], True), strict=True))
        return [mels[i] for i in range(len(streams))]

    def _solve(
        self, streams: list[FlowStream], ends: list[int], final: list[bool], streaming: bool,
    ) -> list[torch.Tensor]:
        """Solve each stream's frames up to token `ends[i]` (its tokens appended)."""
        mu, valid, counts = self._features(streams, ends)
        past = [s.frames for s in streams]
        if any(p + c > self.noise.size(0) for p, c in zip(past, counts, strict=True)):
            raise ValueError(f"utterance exceeds {self.noise.size(0)} mel frames")
        n = mu.size(1)
        dev, dtype = mu.device, mu.dtype
        positions = (torch.tensor(past).view(-1, 1)
                     + torch.arange(n).view(1, -1)).clamp(max=self.noise.size(0) - 1)
        x = self.noise[to_device(positions, dev)].to(dtype) * valid.unsqueeze(-1).to(dtype)
        cond = torch.zeros_like(mu)
        for i, (s, c) in enumerate(zip(streams, counts, strict=True)):
            prompt = s.prompt_mel[s.frames: s.frames + c]
            if prompt.numel():
                cond[i, : prompt.size(0)] = prompt
        chunk = self.cfg.dit.static_chunk_size
        commits = [c if fin or not streaming else (p + c) // chunk * chunk - p
                   for p, c, fin in zip(past, counts, final, strict=True)]
        if not streaming:
            x, _ = self._steps(x, mu, cond, streams, counts, commits, None)
            return self._finish(streams, x, past, counts, commits, final)
        store = self.flow_pages()
        page = store.page_frames
        if any(p % page for p in past):  # its last page would be shared (a prompt's), or full
            raise ValueError("a stream continues only from a line of the attention grid")
        taken: list[int] = []
        try:
            rows = []  # per stream, each step's pages for its frames so far and the new ones
            for s, p, c in zip(streams, past, counts, strict=True):
                own = [() if s.state is None else step_pages(s.state.pages, k)
                       for k in range(STEPS)]
                extra = -(-(p + c) // page) - len(own[0])
                new = store.take(extra * STEPS)
                taken += new
                rows.append([(*own[k], *new[k * extra: (k + 1) * extra]) for k in range(STEPS)])
            x, tails = self._steps(x, mu, cond, streams, counts, commits, (store, rows))
            assert tails is not None
            states = []
            for i, (p, kept) in enumerate(zip(past, commits, strict=True)):
                held = -(-(p + kept) // page)
                pages = tuple(page_id for k in range(STEPS) for page_id in rows[i][k][:held])
                states.append(store.state(p + kept, pages, tails[:, :, :, i].clone()))
        finally:
            store.release(taken)
        for s, state in zip(streams, states, strict=True):
            s.state = state
        return self._finish(streams, x, past, counts, commits, final)

    def _finish(self, streams: list[FlowStream], x: torch.Tensor, past: list[int],
                counts: list[int], commits: list[int], final: list[bool]) -> list[torch.Tensor]:
        """Each stream's new frames [80, n] from the solved `x` (after its `past` frames), its
        counters moved on."""
        out = []
        solved = x.float()  # one conversion for every stream; each takes a view of it
        for i, (s, p, c, kept, fin) in enumerate(zip(streams, past, counts, commits, final,
                                                     strict=True)):
            skip = max(s.prompt_mel.size(0), s.emitted) - p
            out.append(solved[i, skip:c].T)
            s.emitted = p + c
            s.done_tokens += kept // self.cfg.token_mel_ratio
            s.finished = fin
        return out

    def _steps(
        self, x: torch.Tensor, mu: torch.Tensor, cond: torch.Tensor, streams: list[FlowStream],
        counts: list[int], commits: list[int],
        paged: tuple[FlowPages, list[list[tuple[int, ...]]]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Euler loop over new frames `x`, `mu`, `cond` [B, N, 80]: the solved frames and,
        when streaming (`paged`: the store and each row's pages per step, which the new frames'
        keys and values are recorded in), the position tails [steps, 2 convs, 2, B, dim, 30]
        where each row's first `commits` frames end."""
        b, n, _ = x.shape
        dev, dtype = x.device, x.dtype
        spk = torch.stack([s.speaker for s in streams])
        past = [s.frames for s in streams]
        lengths, past_len, commit = to_device(torch.tensor([counts, past, commits]), dev).repeat(
            1, 2)
        t_span = torch.linspace(0, 1, STEPS + 1, device=dev, dtype=dtype)
        if self.cfg.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        t, dt = t_span[0], t_span[1] - t_span[0]
        rate = self.cfg.inference_cfg_rate
        zeros = torch.zeros_like(mu)
        graphs = self.step_graphs if paged is not None else None
        bucket = None if graphs is None else graphs.usable_bucket(b, n, max(past), mu.is_cuda)
        if paged is not None:
            store, rows = paged
            padded = b if bucket is None else bucket.rows
            width_past = max(past) if bucket is None else bucket.past
            width_new = n if bucket is None else bucket.frames
            pad = padded - b
            # Every step's rows in one call, each step's padded with rows of nothing.
            write, read = paged_slots(
                [page_ids for k in range(STEPS) for page_ids in [*(r[k] for r in rows),
                                                                 *[()] * pad]],
                (past + [0] * pad) * STEPS, (counts + [0] * pad) * STEPS, STEPS * padded,
                width_past, width_new, store.page_frames, store.store.device)
            write, read = write.view(STEPS, -1), read.view(STEPS, -1)
            tails_in = torch.stack([self.tails_like() if s.state is None else s.state.tails
                                    for s in streams], dim=3)  # [steps, 2, 2, B, dim, 30]
        step_tails = []
        for step in range(STEPS):
            if paged is not None and graphs is not None and bucket is not None:
                replayed = graphs.step(bucket, store, x, mu, cond, spk, t, lengths[:b],
                                       commit[:b], past_len[:b], write[step], read[step],
                                       tails_in[step])
                step_tails.append(self._step_tails(replayed.tails, b, bucket.rows))
                guided = replayed.velocity[:b, :n]
                unguided = replayed.velocity[bucket.rows: bucket.rows + b, :n]
            else:
                if paged is not None:
                    conv_tails = tails_in[step].flatten(1, 2)
                    cache = StepCache(past_len, PagedFrames(store.flat()[0], write[step],
                                                            read[step]),
                                      [conv_tails[0], conv_tails[1]], commit)
                else:
                    cache = StepCache(past_len, None, [zeros.new_zeros(
                        2 * b, self.cfg.dit.dim, POS_KERNEL - 1)] * 2)
                v = self.estimator(
                    torch.cat([x, x]), torch.cat([mu, zeros]), torch.cat([cond, zeros]),
                    torch.cat([spk, torch.zeros_like(spk)]), t.expand(2 * b), lengths, cache,
                    paged is not None,
                )
                if paged is not None:
                    step_tails.append(self._step_tails(cache.new_tails, b, b))
                guided, unguided = v.split(b)
            x = x + dt * ((1.0 + rate) * guided - rate * unguided)
            t = t + dt
            if step < STEPS - 1:
                dt = t_span[step + 2] - t
        return x, torch.stack(step_tails) if step_tails else None

    @torch.inference_mode()
    def whole(
        self, prompt_tokens: list[torch.Tensor], tokens: list[torch.Tensor],
        prompt_mels: list[torch.Tensor], embeddings: list[torch.Tensor], streaming: bool,
        final: bool = True,
    ) -> list[torch.Tensor]:
        """Mel [80, frames] of each request's tokens in one pass, batched: upstream's
        `inference` (a non-final pass holds back the look-ahead tokens, on the grid or not)."""
        streams = [self.start(p, m, e)
                   for p, m, e in zip(prompt_tokens, prompt_mels, embeddings, strict=True)]
        ends = [self._prepare(s, tok, final, streaming)
                for s, tok in zip(streams, tokens, strict=True)]
        return self._solve(streams, ends, [True] * len(streams), streaming)


def load_v3_flow(model_dir: Path, cfg: V3FlowConfig) -> CosyVoice3Flow:
    """The model of `model_dir/flow.pt` (CPU, float32, eval mode)."""
    model = CosyVoice3Flow(cfg)
    path = model_dir / "flow.pt"
    load_into(model, read_state(path), path)
    return model.eval()
