"""CosyVoice3's audio stage for the shared scheduler: tokens -> DiT flow -> causal vocoder.

The scheduler treats it as it treats CosyVoice2's `AudioStage`: `next_chunk` says whether an
utterance has a chunk ready, `run` turns the chunks of many utterances into audio at once, and
`finished` says when an utterance is all spoken. Both stages here are incremental from the start:
each utterance keeps its flow state (per-step keys and values, convolution tails) and its
vocoder state, so a chunk costs its own frames, and a new stream starts from its prompt's
prefix, solved once per prompt and kept (`prompt_states`). Silent tokens beyond five in a row
are dropped on their way to the flow, as upstream does; the LLM itself saw them all. Both
noises are fixed (the flow's drawn with seed 0, the vocoder's a buffer indexed by each request's
own sample positions), so a request's audio depends on its tokens alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.engines.cosyvoice import v3_hift_stream
from worker.engines.cosyvoice.batching import each_fails_alone
from worker.engines.cosyvoice.flow_state import FlowState
from worker.engines.cosyvoice.pipeline import Chunk, Utterance, next_chunk, tokens_due
from worker.engines.cosyvoice.prompt_states import PromptStates, prompt_key
from worker.engines.cosyvoice.v3_flow import CosyVoice3Flow, FlowStream
from worker.engines.cosyvoice.v3_hift import CausalHiFT, HiFTNoise
from worker.engines.cosyvoice.v3_hift_graphs import V3VocoderGraphs
from worker.engines.cosyvoice.v3_hift_stream import HiFTStream
from worker.engines.cosyvoice.v3_llm import filter_silent


@dataclass
class V3Utterance(Utterance):
    """An `Utterance` with what CosyVoice3's stages keep: the tokens that go to the flow (after
    the silent-token filter) and both stages' states."""

    flow_tokens: list[int] = field(default_factory=list)
    filtered: int = 0
    silent_run: int = 0
    flow_stream: FlowStream | None = None
    hift_stream: HiFTStream | None = None


class V3AudioStage:
    def __init__(self, flow: CosyVoice3Flow, hift: CausalHiFT, noise: HiFTNoise,
                 device: torch.device, prompt_state_bytes: int = 0) -> None:
        self.flow = flow
        self.hift = hift
        self.noise = noise
        self.device = device
        self.lookahead = flow.cfg.pre_lookahead_len
        self.sample_rate = hift.cfg.sampling_rate
        self.prompt_states: PromptStates[FlowState] = PromptStates(prompt_state_bytes)
        """New streams start from their prompt's prefix (`CosyVoice3Flow.solve_prefixes`),
        kept per prompt; a budget of 0 solves every prompt with its first chunk."""
        self.vocoder_graphs: V3VocoderGraphs | None = None
        """Set (and captured) by the engine on a GPU: the vocoder's decoder as graphs."""

    def _filter(self, utt: V3Utterance) -> None:
        new = utt.tokens[utt.filtered : len(utt.tokens)]
        kept, utt.silent_run = filter_silent(new, utt.silent_run)
        utt.filtered += len(new)
        utt.flow_tokens.extend(kept)

    def next_chunk(self, utt: Utterance) -> Chunk | None:
        assert isinstance(utt, V3Utterance)
        decoded = utt.decoded  # read before the tokens: once set, no token is added
        self._filter(utt)
        return next_chunk(utt, decoded, utt.flow_tokens, self.lookahead)

    def tokens_due(self, utt: Utterance) -> int:
        assert isinstance(utt, V3Utterance)
        return tokens_due(utt, utt.flow_tokens, self.lookahead)

    def finished(self, utt: Utterance) -> bool:
        assert isinstance(utt, V3Utterance)
        return utt.decoded and utt.filtered == len(utt.tokens) and \
            len(utt.flow_tokens) <= utt.offset

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[np.ndarray | Exception]:
        """Audio for every chunk (float32, in order), or the exception that chunk alone raised.

        A failure of the batched call is retried chunk by chunk, so one bad chunk fails alone;
        a call that fails, at any point, leaves every request's state as it was.
        """
        return each_fails_alone(self._speak, chunks)

    def _start_from_prefixes(self, utts: list[V3Utterance]) -> None:
        """Streams not yet started take their prompt's prefix: kept, or solved now (once per
        prompt in the call, by the first stream that needs it) and kept."""
        fresh = [(u, s) for u in utts if (s := u.flow_stream) is not None and s.frames == 0]
        if not fresh or self.prompt_states.max_bytes <= 0:
            return
        keys = [prompt_key(u.flow_prompt_tokens, u.prompt_mel, u.embedding) for u, _ in fresh]
        solved: set[int] = set()

        def solve(positions: list[int]) -> list[FlowState | None]:
            solved.update(positions)
            return self.flow.solve_prefixes([fresh[p][1] for p in positions])

        for i, ((_, stream), prefix) in enumerate(
                zip(fresh, self.prompt_states.get(keys, solve), strict=True)):
            if prefix is not None and i not in solved:
                self.flow.seed(stream, prefix)

    def _advance(self, chunks: list[Chunk], utts: list[V3Utterance]) -> list[torch.Tensor]:
        streams = [u.flow_stream for u in utts]
        given = [s.tokens.numel() - u.flow_prompt_tokens.size(1) for s, u in
                 zip(streams, utts, strict=True) if s is not None]
        new_tokens = [torch.tensor(c.tokens[g:], dtype=torch.long)
                      for c, g in zip(chunks, given, strict=True)]
        finals = [c.finalize for c in chunks]
        mels = self.flow.advance([s for s in streams if s is not None], new_tokens, finals)
        vocoders = [u.hift_stream for u in utts if u.hift_stream is not None]
        return v3_hift_stream.advance(self.hift, vocoders, mels, finals, self.noise,
                                      self.vocoder_graphs)

    def _speak(self, chunks: list[Chunk]) -> list[np.ndarray]:
        utts = []
        for chunk in chunks:
            utt = chunk.utterance
            assert isinstance(utt, V3Utterance)
            if utt.speed != 1.0:
                raise ValueError("CosyVoice3 streams at speed 1.0 only")
            if utt.flow_stream is None:
                utt.flow_stream = self.flow.start(
                    utt.flow_prompt_tokens[0], utt.prompt_mel[0], utt.embedding[0])
                harmonics = self.hift.cfg.nb_harmonics + 1
                utt.hift_stream = HiFTStream.new(self.hift.cfg.in_channels, harmonics,
                                                 self.device)
            utts.append(utt)
        # Both stages replace what they change in a state rather than writing into it (the flow
        # writes keys and values only past a stream's frames), so shallow copies restore them.
        saved = [(copy.copy(u.flow_stream), copy.copy(u.hift_stream)) for u in utts]
        try:
            self._start_from_prefixes(utts)
            audio = self._advance(chunks, utts)
        except BaseException:
            for utt, (flow_stream, hift_stream) in zip(utts, saved, strict=True):
                utt.flow_stream, utt.hift_stream = flow_stream, hift_stream
            raise
        out = []
        for chunk, utt, samples in zip(chunks, utts, audio, strict=True):
            utt.offset = chunk.end
            if chunk.finalize:
                utt.flow_stream = utt.hift_stream = None
            out.append(samples.float().cpu().numpy())
        return out
