"""Per-request state between the stages, and the audio stage: tokens -> mel -> waveform.

`Utterance` is one request piece's state: its inputs, the tokens the LLM has produced so far,
how far audio has been produced, and the vocoder's overlap cache. `AudioStage` turns the next
chunk of many utterances into audio at once: one flow call over all of them (padded and masked),
then one vocoder call per group of equal-length mels, each row with its own random stream. Nothing
in `AudioStage` remembers a request; keeping the two apart is what lets requests share a GPU
without sharing state.
"""

# Module calls are typed Any by torch; returns below are tensors by construction.
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from worker.engines.cosyvoice.batching import each_fails_alone
from worker.engines.cosyvoice.flow import FlowModel, FlowRow
from worker.engines.cosyvoice.flow_state import FlowState
from worker.engines.cosyvoice.hift import HiFTGenerator, samples_per_frame
from worker.engines.cosyvoice.hift_graphs import VocoderGraphs
from worker.engines.cosyvoice.prompt_states import PromptStates, prompt_key

TOKEN_HOP = 25
MEL_CACHE_FRAMES = 8


@dataclass
class Utterance:
    """One piece of text to speak, with everything it needs and everything it has produced.

    The decoding side appends to `tokens` and then sets `decoded`; the audio side reads them and
    owns the fields after `decoded`.
    """

    text_ids: list[int]
    tts_token_count: int
    llm_prompt_tokens: torch.Tensor
    flow_prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    embedding: torch.Tensor
    seed: int
    speed: float = 1.0
    first_chunk: int | None = None
    later_hops: int = 1
    """Grid chunks (25 tokens each) in a later chunk once a hop past the first chunk is spoken:
    fewer, larger audio calls."""
    tokens: list[int] = field(default_factory=list)
    decoded: bool = False
    offset: int = 0
    flow_state: FlowState | None = None
    mel_cache: torch.Tensor | None = None
    source_cache: torch.Tensor | None = None
    speech_tail: torch.Tensor | None = None

    def hop(self) -> int:
        """Tokens in the next chunk. The first is a hop plus enough to align prompt + chunk on
        the model's 25-token chunk grid (as released), or `first_chunk` tokens if given and
        fewer; every later chunk ends on the grid: the next grid line while less than a hop
        past the first chunk is spoken (the listener has little audio yet), then `later_hops`
        lines on. A function of the offset alone, so a request's chunks, and its audio, do not
        depend on what else is served."""
        p = self.flow_prompt_tokens.size(1)
        aligned = TOKEN_HOP + (math.ceil(p / TOKEN_HOP) * TOKEN_HOP - p)
        first = aligned if self.first_chunk is None else min(aligned, self.first_chunk)
        if self.offset == 0:
            return first
        to_grid = TOKEN_HOP - (p + self.offset) % TOKEN_HOP
        if self.offset < first + TOKEN_HOP:
            return to_grid
        return to_grid + TOKEN_HOP * (self.later_hops - 1)


@dataclass(frozen=True)
class Chunk:
    """The next piece of audio to make for `utterance`: from its tokens so far, `tokens`, the
    audio up to token `end` (the utterance's offset once the chunk is spoken)."""

    utterance: Utterance
    tokens: list[int]
    finalize: bool
    end: int


def next_chunk(utt: Utterance, decoded: bool, tokens: list[int], lookahead: int
               ) -> Chunk | None:
    """The next chunk of `utt` over `tokens` (what its flow reads) if they allow one now:
    its hop plus its look-ahead, or, once `decoded` (read before `tokens`), the rest."""
    available = len(tokens)
    hop = utt.hop()
    upto = utt.offset + hop + lookahead
    if available >= upto:
        return Chunk(utt, tokens[:upto], False, utt.offset + hop)
    if decoded and available > utt.offset:
        return Chunk(utt, tokens[:available], True, available)
    return None


def tokens_due(utt: Utterance, tokens: list[int], lookahead: int) -> int:
    """Speech tokens `utt` still needs, past `tokens`, for its next chunk (0 once decoded)."""
    if utt.decoded:
        return 0
    return max(0, utt.offset + utt.hop() + lookahead - len(tokens))


class AudioStage:
    def __init__(self, flow: FlowModel, hift: HiFTGenerator, device: torch.device,
                 flow_steps: int = 10, prompt_state_bytes: int = 0) -> None:
        self.flow = flow
        self.hift = hift
        self.device = device
        self.flow_steps = flow_steps
        self.lookahead = flow.cfg.pre_lookahead_len
        self.ratio = flow.cfg.token_mel_ratio
        self.sample_rate = hift.cfg.sampling_rate
        self.source_cache_len = MEL_CACHE_FRAMES * samples_per_frame(hift.cfg)
        self.vocoder_graphs: VocoderGraphs | None = None
        """Set (and captured) by the engine on a GPU: the vocoder as graphs for the chunk
        shapes streaming repeats (`streamed_shapes`)."""
        self.window = torch.from_numpy(np.hamming(2 * self.source_cache_len).astype(np.float32))
        self.prompt_states: PromptStates[FlowState] = PromptStates(prompt_state_bytes)
        """First chunks start from their prompt's state, kept per prompt (`prompt_states.py`);
        a budget of 0 solves every prompt with its first chunk."""

    def streamed_shapes(self, later_hops: int = 1) -> tuple[tuple[int, int], ...]:
        """(mel frames, excitation samples carried over) of a first chunk of 25 tokens and of
        every later full chunk of 1 to `later_hops` hops."""
        frames = TOKEN_HOP * self.ratio
        later = [(n * frames + MEL_CACHE_FRAMES, self.source_cache_len)
                 for n in range(1, later_hops + 1)]
        return ((frames, 0), *later)

    def finished(self, utt: Utterance) -> bool:
        """Every token decoded and spoken (or none produced)."""
        return utt.decoded and len(utt.tokens) <= utt.offset

    def next_chunk(self, utt: Utterance) -> Chunk | None:
        """The utterance's next chunk if its tokens allow one now, else None."""
        decoded = utt.decoded  # read before the tokens: once set, no token is added
        return next_chunk(utt, decoded, utt.tokens, self.lookahead)

    def tokens_due(self, utt: Utterance) -> int:
        return tokens_due(utt, utt.tokens, self.lookahead)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[np.ndarray | Exception]:
        """Audio for every chunk (float32, in order), or the exception that chunk alone raised.

        A failure of a batched flow or vocoder call is retried row by row, so one bad row fails
        alone (a vocoder call changes a row's state only once it has its audio).
        """
        mels = each_fails_alone(self._mels, chunks)
        audio: list[np.ndarray | Exception] = list(mels)  # type: ignore[arg-type]
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        prepared: dict[int, torch.Tensor] = {}
        for i, (chunk, mel) in enumerate(zip(chunks, mels, strict=True)):
            if isinstance(mel, Exception):
                continue
            utt = chunk.utterance
            if utt.speed != 1.0:
                mel = F.interpolate(mel.unsqueeze(0), size=max(1, int(mel.size(1) / utt.speed)),
                                    mode="linear")[0]
            if utt.mel_cache is not None:
                mel = torch.cat([utt.mel_cache, mel], dim=1)
            prepared[i] = mel
            groups[(mel.size(1), utt.source_cache is not None)].append(i)
        def vocode(members: list[int]) -> list[np.ndarray | Exception]:
            return self._vocode([chunks[i] for i in members], [prepared[i] for i in members])

        for members in groups.values():
            for i, out in zip(members, each_fails_alone(vocode, members), strict=True):
                audio[i] = out
        return audio

    def _mels(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        rows = []
        for chunk in chunks:
            utt = chunk.utterance
            rows.append(FlowRow(
                tokens=torch.tensor(chunk.tokens, dtype=torch.int32),
                prompt_tokens=utt.flow_prompt_tokens[0],
                prompt_mel=utt.prompt_mel[0],
                embedding=utt.embedding[0],
                finalize=chunk.finalize,
                streaming=True,
            ))
        states = self._states(chunks, rows)
        emitted = [c.utterance.offset * self.ratio for c in chunks]
        mels, updated = self.flow.stream_batch(rows, states, self.flow_steps, emitted)
        for chunk, state in zip(chunks, updated, strict=True):
            chunk.utterance.flow_state = None if chunk.finalize else state
        return mels

    def _states(self, chunks: list[Chunk], rows: list[FlowRow]) -> list[FlowState | None]:
        """Each chunk's flow state: its utterance's, or for a first chunk its prompt's."""
        states = [c.utterance.flow_state for c in chunks]
        if self.prompt_states.max_bytes <= 0:
            return states
        first = [i for i, c in enumerate(chunks)
                 if c.utterance.offset == 0 and states[i] is None]
        if not first:
            return states
        keys = [prompt_key(r.prompt_tokens, r.prompt_mel, r.embedding)
                for r in (rows[i] for i in first)]

        def compute(positions: list[int]) -> list[FlowState | None]:
            return self.flow.prompt_states([rows[first[p]] for p in positions], self.flow_steps)

        for i, state in zip(first, self.prompt_states.get(keys, compute), strict=True):
            states[i] = state
        return states

    def _vocode(
        self, chunks: list[Chunk], mels: list[torch.Tensor]
    ) -> list[np.ndarray | Exception]:
        """Vocoder over equal-length mels, cross-fading each with its previous chunk's tail."""
        utts = [c.utterance for c in chunks]
        generators: list[torch.Generator | None] = [
            torch.Generator(self.device).manual_seed(c.utterance.seed + c.end) for c in chunks
        ]
        mel = torch.stack(mels).to(self.device)
        caches = [u.source_cache for u in utts]
        cache = None
        if caches[0] is not None:
            cache = torch.cat([c for c in caches if c is not None])
        mel = mel.float()
        initial, noise = self.hift.draws(mel, generators)
        result = None
        if self.vocoder_graphs is not None:
            result = self.vocoder_graphs.vocode(mel, cache, initial, noise)
        speech, source = result or self.hift.vocode(mel, cache, initial, noise)
        speech = speech.float().cpu()
        out: list[np.ndarray | Exception] = []
        n = self.source_cache_len
        for i, (chunk, utt) in enumerate(zip(chunks, utts, strict=True)):
            wav = speech[i : i + 1].clone()
            if utt.speech_tail is not None:
                wav[:, :n] = wav[:, :n] * self.window[:n] + utt.speech_tail * self.window[n:]
            utt.offset = chunk.end
            if not chunk.finalize:
                utt.mel_cache = mels[i][:, -MEL_CACHE_FRAMES:]
                utt.source_cache = source[i : i + 1, :, -n:]
                utt.speech_tail = wav[:, -n:]
                wav = wav[:, :-n]
            out.append(wav[0].numpy().astype(np.float32, copy=False))
        return out
