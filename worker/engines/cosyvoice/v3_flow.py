"""The CosyVoice3 flow: speech tokens to mel frames, whole or incrementally, many requests at once.

Names follow the released `flow.pt`: `input_embedding` (tokens to 80 dims),
`spk_embed_affine_layer`, `pre_lookahead_layer` (a kernel-4 convolution over each token and the
3 after it, then a causal kernel-3 one, plus the input) and the DiT under `decoder.estimator`.
Each token becomes `token_mel_ratio` frames; a 10-step Euler solver with cosine schedule
integrates the estimator's velocity from fixed noise (guided and unguided passes: one batch of 2B).

Incremental streaming: a `FlowStream` per request keeps, for every Euler step, the keys and values
of its frames at every layer and the tails of the position convolutions, so `advance` computes
only new frames. Attention is chunk-causal on a `static_chunk_size` grid counted from the first
prompt frame, so frames before the last grid line never change and are kept; frames after it
(a call that ends off the grid) are returned but computed again, with what follows, by the next
call, exactly as a recompute-everything stream would see them. The noise is a fixed buffer
indexed by a frame's position in its utterance (prompt included), drawn once from seed 0 as the
released recipe draws it, so requests share no state.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from worker.engines.cosyvoice.v3_config import V3FlowConfig
from worker.engines.cosyvoice.v3_dit import POS_KERNEL, DiT, StepCache
from worker.engines.cosyvoice.v3_flow_graphs import DiTStepGraphs
from worker.engines.cosyvoice.weights import load_into, read_state

STEPS = 10
NOISE_FRAMES = 50 * 300
NOISE_SEED = 0
PAGE_FRAMES = 256
"""Frames of a stream's keys and values per page (0.46 GB on the released model, bf16). States
grow a page at a time and every page is the same size, so the caching allocator hands a
finished stream's pages to the next as they are: states that grew by reallocation, each to its
own size, copied everything at each growth and left blocks of every size behind (13-18 GB
reserved but unusable when 64-80 streams ran out of memory on an H200; 3.5 GB in pages)."""


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


@dataclass(eq=False)
class FlowStream:
    """One request's flow state. `pages`, each [steps, layers, 2 (k, v), 2 (guided, unguided),
    heads, PAGE_FRAMES, dim_head], and `tails` [steps, 2 convs, 2, dim, 30] hold the
    estimator's view of its first `frames` mel frames; `tokens` are all tokens received (prompt
    first)."""

    tokens: torch.Tensor
    prompt_mel: torch.Tensor
    speaker: torch.Tensor
    done_tokens: int
    frames: int
    page_shape: tuple[int, ...]
    tails: torch.Tensor
    pages: list[torch.Tensor] = field(default_factory=list)
    emitted: int = 0
    """Frames returned so far (prompt included), at or past `frames`."""
    finished: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.pages, self.tails))

    @property
    def capacity(self) -> int:
        return len(self.pages) * PAGE_FRAMES

    def reserve(self, frames: int) -> None:
        """Pages for `frames` frames, added to a new list (a copy of the stream keeps its own)."""
        missing = -(-frames // PAGE_FRAMES) - len(self.pages)
        if missing > 0:
            self.pages = self.pages + [self.tails.new_zeros(self.page_shape)
                                       for _ in range(missing)]

    def copy_past(self, step: int, out: torch.Tensor) -> None:
        """Its first `frames` keys and values of `step` into `out` [layers, 2, 2, heads,
        >= frames, dim_head]: one copy per page."""
        for page, start in zip(self.pages, range(0, self.frames, PAGE_FRAMES), strict=False):
            n = min(PAGE_FRAMES, self.frames - start)
            out[..., start: start + n, :] = page[step, ..., :n, :]

    def write(self, step: int, new: torch.Tensor) -> None:
        """Keys and values of `step` for the frames after its first `frames`, from `new`
        [layers, 2, 2, heads, N, dim_head] (pages reserved): past the frames it holds, so a
        call that fails part way leaves what it holds as it was."""
        done, n = 0, new.size(-2)
        while done < n:
            page, offset = divmod(self.frames + done, PAGE_FRAMES)
            take = min(n - done, PAGE_FRAMES - offset)
            self.pages[page][step, ..., offset: offset + take, :] = new[..., done: done + take, :]
            done += take


@dataclass(eq=False)
class PromptPrefix:
    """A prompt's flow state over its first `frames` frames, up to the last chunk line its
    look-ahead cannot reach: every request with that prompt computes it first, the same.
    `kv` [steps, layers, 2 (k, v), 2 (guided, unguided), heads, frames, dim_head] and `tails`
    [steps, 2 convs, 2, dim, 30] as a stream holds them."""

    frames: int
    kv: torch.Tensor
    tails: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + \
            self.tails.numel() * self.tails.element_size()


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

    @property
    def estimator(self) -> DiT:
        return self.decoder.estimator

    def start(
        self, prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor, embedding: torch.Tensor
    ) -> FlowStream:
        """A new request: prompt tokens [P], their mel [ratio * P, 80], speaker embedding [192]."""
        ratio = self.cfg.token_mel_ratio
        if prompt_mel.size(0) != ratio * prompt_tokens.numel():
            raise ValueError(f"prompt mel has {prompt_mel.size(0)} frames, "
                             f"expected {ratio} per prompt token ({prompt_tokens.numel()})")
        dit = self.cfg.dit
        w = self.input_embedding.weight
        speaker = self.spk_embed_affine_layer(F.normalize(embedding.view(1, -1).to(w), dim=1))
        page_shape = (STEPS, dit.depth, 2, 2, dit.heads, PAGE_FRAMES, dit.dim_head)
        tails = w.new_zeros(STEPS, 2, 2, dit.dim, POS_KERNEL - 1)
        return FlowStream(prompt_tokens.long().to(w.device).view(-1), prompt_mel.to(w),
                          speaker[0], 0, 0, page_shape, tails)

    def prefix_frames(self, prompt_tokens: int) -> int:
        """Frames of a prompt of this many tokens that depend on the prompt alone: those of its
        tokens before the last `pre_lookahead_len` (whose features read the request's first
        tokens), down to a chunk line (a frame sees every frame up to its chunk's end)."""
        chunk = self.cfg.dit.static_chunk_size
        free = (prompt_tokens - self.cfg.pre_lookahead_len) * self.cfg.token_mel_ratio
        return max(0, free // chunk * chunk)

    @torch.inference_mode()
    def solve_prefixes(self, streams: list[FlowStream]) -> list[PromptPrefix | None]:
        """Advance new streams over their prompts' prefixes (`prefix_frames`), in one batch,
        and return each prefix's state (None where the prompt is too short to have one)."""
        if any(s.frames for s in streams):
            raise ValueError("a prompt's prefix is solved on a new stream")
        ratio = self.cfg.token_mel_ratio
        ends = [self.prefix_frames(s.tokens.numel()) for s in streams]
        rows = [i for i, end in enumerate(ends) if end > 0]
        if rows:
            self._solve([streams[i] for i in rows],
                        [self._features(streams[i], ends[i] // ratio, False) for i in rows],
                        [False] * len(rows), True)
        prefixes: list[PromptPrefix | None] = [None] * len(streams)
        for i in rows:
            s = streams[i]
            kv = s.tails.new_empty(*s.page_shape[:5], s.frames, s.page_shape[6])
            for step in range(STEPS):
                s.copy_past(step, kv[step])
            prefixes[i] = PromptPrefix(s.frames, kv, s.tails.clone())
        return prefixes

    def seed(self, stream: FlowStream, prefix: PromptPrefix) -> None:
        """Start a new stream from its prompt's prefix, as if it had solved it itself."""
        if stream.frames:
            raise ValueError("a prompt's prefix seeds a new stream")
        stream.reserve(prefix.frames)
        for step in range(STEPS):
            stream.write(step, prefix.kv[step])
        stream.tails = prefix.tails.clone()
        stream.frames = stream.emitted = prefix.frames
        stream.done_tokens = prefix.frames // self.cfg.token_mel_ratio

    def _features(self, stream: FlowStream, end: int, final: bool) -> torch.Tensor:
        """Token features of tokens [done, end) as mel-rate rows [ratio * (end - done), 80]."""
        look = self.cfg.pre_lookahead_len
        first = max(stream.done_tokens - 2, 0)
        ids = stream.tokens[first: end + look]
        x = self.input_embedding(ids.clamp(min=0)).unsqueeze(0)
        if final:
            x = F.pad(x, (0, 0, 0, end + look - first - ids.numel()))
        h = self.pre_lookahead_layer(x)[0, stream.done_tokens - first:]
        return h.repeat_interleave(self.cfg.token_mel_ratio, dim=0)

    @staticmethod
    def _gather(streams: list[FlowStream], step: int, past: int, frames: int,
                lens: torch.Tensor) -> tuple[StepCache, torch.Tensor]:
        """The call's view of `step` for its streams, and where it writes the new frames' keys
        and values [layers, 2 (k, v), 2 (guided, unguided), B, heads, frames, dim_head]. `lens`
        [2B]: each row's earlier frames (the same for every step of a call); the keys and values
        have room for `frames` new ones after the `past` earlier."""
        tails = torch.stack([s.tails[step] for s in streams], dim=2)  # [2 convs, 2, B, D, 30]
        tails = tails.flatten(1, 2)
        layers, _, _, heads, _, dim_head = streams[0].page_shape[1:]
        # zeros: entries past a row's own frames are masked but must be finite
        kv = tails.new_zeros(layers, 2, 2, len(streams), heads, past + frames, dim_head)
        for i, s in enumerate(streams):
            s.copy_past(step, kv[:, :, :, i])
        rows = kv.flatten(2, 3)  # [layers, 2 (k, v), 2B, heads, past + frames, dim_head]
        cache = StepCache(lens, list(rows[:, 0]), list(rows[:, 1]), [tails[0], tails[1]])
        return cache, kv[..., past:, :]

    @staticmethod
    def _keep(streams: list[FlowStream], step: int, new_kv: torch.Tensor,
              counts: list[int]) -> None:
        """Copy each stream's new keys and values of `step` from `new_kv` [layers, 2 (k, v),
        2 (guided, unguided), rows, heads, N, dim_head] into its state. Rows are taken as views,
        one copy each: indexing with a list would move the index to the device, a
        synchronisation per row."""
        for i, (s, n) in enumerate(zip(streams, counts, strict=True)):
            s.write(step, new_kv[:, :, :, i, :, :n])

    @staticmethod
    def _step_tails(new_tails: list[torch.Tensor], rows: int, unguided: int) -> torch.Tensor:
        """A step's new position-convolution tails as [2 convs, 2 (guided, unguided), rows, D,
        30] (a copy: graph outputs change at the next replay); each stream's unguided row sits
        `unguided` rows after its guided one."""
        tails = torch.stack(new_tails).view(len(new_tails), 2, unguided, *new_tails[0].shape[1:])
        return tails[:, :, :rows]

    def _prepare(
        self, s: FlowStream, tokens: torch.Tensor, final: bool, streaming: bool
    ) -> torch.Tensor:
        if s.finished:
            raise ValueError("this request's flow has already finished")
        if not streaming and s.frames:
            raise ValueError("a non-streaming pass is one call on a new request")
        total = s.tokens.numel() + tokens.numel()
        end = total if final else total - self.cfg.pre_lookahead_len
        if end * self.cfg.token_mel_ratio <= max(s.emitted, s.prompt_mel.size(0)):
            raise ValueError("a call must bring at least one new token past the look-ahead")
        s.tokens = torch.cat([s.tokens, tokens.long().to(s.tokens.device).view(-1)])
        return self._features(s, end, final)

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
        mus = [self._prepare(s, tok, fin, True)
               for s, tok, fin in zip(streams, new_tokens, final, strict=True)]
        mels: dict[int, torch.Tensor] = {}
        for group in (g for g in (first, later) if g):
            mels.update(zip(group, self._solve([streams[i] for i in group],
                                               [mus[i] for i in group],
                                               [final[i] for i in group], True), strict=True))
        return [mels[i] for i in range(len(streams))]

    def _solve(
        self, streams: list[FlowStream], mus: list[torch.Tensor], final: list[bool],
        streaming: bool,
    ) -> list[torch.Tensor]:
        counts = [m.size(0) for m in mus]
        b, n = len(streams), max(counts)
        dev, dtype = mus[0].device, mus[0].dtype
        mu = torch.zeros(b, n, self.cfg.output_size, device=dev, dtype=dtype)
        cond, x = torch.zeros_like(mu), torch.zeros_like(mu)
        for i, (s, m, c) in enumerate(zip(streams, mus, counts, strict=True)):
            if s.frames + c > self.noise.size(0):
                raise ValueError(f"utterance exceeds {self.noise.size(0)} mel frames")
            mu[i, :c] = m
            x[i, :c] = self.noise[s.frames: s.frames + c].to(dtype)
            prompt = s.prompt_mel[s.frames: s.frames + c]
            cond[i, : prompt.size(0)] = prompt
        past = max(s.frames for s in streams)
        if streaming:
            for s, c in zip(streams, counts, strict=True):
                s.reserve(s.frames + c)
        spk = torch.stack([s.speaker for s in streams])
        lengths = torch.tensor(counts, device=dev).repeat(2)
        past_len = torch.tensor([s.frames for s in streams], device=dev).repeat(2)
        chunk = self.cfg.dit.static_chunk_size
        commits = [c if fin or not streaming else (s.frames + c) // chunk * chunk - s.frames
                   for s, c, fin in zip(streams, counts, final, strict=True)]
        commit = torch.tensor(commits, device=dev).repeat(2)
        t_span = torch.linspace(0, 1, STEPS + 1, device=dev, dtype=dtype)
        if self.cfg.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        t, dt = t_span[0], t_span[1] - t_span[0]
        rate = self.cfg.inference_cfg_rate
        zeros = torch.zeros_like(mu)
        graphs = self.step_graphs if streaming else None
        bucket = None if graphs is None else graphs.usable_bucket(b, n, past, mu.is_cuda)
        step_tails = []
        for step in range(STEPS):
            if graphs is not None and bucket is not None:
                replayed = graphs.step(bucket, streams, step, x, mu, cond, spk, t, lengths[:b],
                                       commit[:b])
                self._keep(streams, step, replayed.kv, counts)
                step_tails.append(self._step_tails(replayed.tails, b, bucket.rows))
                guided = replayed.velocity[:b, :n]
                unguided = replayed.velocity[bucket.rows : bucket.rows + b, :n]
            else:
                if streaming:
                    cache, new_kv = self._gather(streams, step, past, n, past_len)
                    cache.commit = commit
                else:
                    cache = StepCache(past_len, None, None, [zeros.new_zeros(
                        2 * b, self.cfg.dit.dim, POS_KERNEL - 1)] * 2)
                v = self.estimator(
                    torch.cat([x, x]), torch.cat([mu, zeros]), torch.cat([cond, zeros]),
                    torch.cat([spk, torch.zeros_like(spk)]), t.expand(2 * b), lengths, cache,
                    streaming,
                )
                if streaming:
                    self._keep(streams, step, new_kv, counts)
                    step_tails.append(self._step_tails(cache.new_tails, b, b))
                guided, unguided = v.split(b)
            x = x + dt * ((1.0 + rate) * guided - rate * unguided)
            t = t + dt
            if step < STEPS - 1:
                dt = t_span[step + 2] - t
        # The tails change only once every step has run: a call that fails part way leaves
        # each stream as it was (the keys and values it wrote lie past the stream's frames).
        tails = torch.stack(step_tails) if step_tails else None
        out = []
        for i, (s, c, kept, fin) in enumerate(zip(streams, counts, commits, final, strict=True)):
            skip = max(s.prompt_mel.size(0), s.emitted) - s.frames
            out.append(x[i, skip:c].T.float())
            if tails is not None:
                s.tails = tails[:, :, :, i].clone()
            s.emitted = s.frames + c
            s.frames += kept
            s.done_tokens += kept // self.cfg.token_mel_ratio
            s.finished = fin
        return out

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
        mus = [self._prepare(s, tok, final, streaming)
               for s, tok in zip(streams, tokens, strict=True)]
        return self._solve(streams, mus, [True] * len(streams), streaming)


def load_v3_flow(model_dir: Path, cfg: V3FlowConfig) -> CosyVoice3Flow:
    """The model of `model_dir/flow.pt` (CPU, float32, eval mode)."""
    model = CosyVoice3Flow(cfg)
    path = model_dir / "flow.pt"
    load_into(model, read_state(path), path)
    return model.eval()
