"""CosyVoice3 on the shared scheduler, on a tiny random-weight model: its LLM decodes in the same
batched decoder and its incremental flow and vocoder run as the scheduler's audio stage; requests
batched together get the tokens and audio they get alone, and a failing one fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from testbed.cosyvoice3_models import build_model_dir
from tests.support.audio_calls import first_chunks_per_call
from tests.support.faults import out_of_memory_when_batched
from worker.engines.cosyvoice import v3_pipeline
from worker.engines.cosyvoice.batch_decode import BatchDecoder
from worker.engines.cosyvoice.prompt_states import PromptStates
from worker.engines.cosyvoice.sampling import SamplingParams
from worker.engines.cosyvoice.scheduler import DONE, DecodeLimits, Scheduler
from worker.engines.cosyvoice.v3_config import check_v3_model_dir
from worker.engines.cosyvoice.v3_flow import load_v3_flow
from worker.engines.cosyvoice.v3_hift import HiFTNoise, load_v3_hift
from worker.engines.cosyvoice.v3_hift_graphs import V3VocoderGraphs
from worker.engines.cosyvoice.v3_llm import CosyVoice3LM, load_v3_llm
from worker.engines.cosyvoice.v3_pipeline import V3AudioStage, V3Utterance

END_OF_PROMPT = 7  # the tiny vocabulary has no <|endofprompt|>; any id stands in for it
TOKENS = 70
AUDIO_TOLERANCE = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    model_dir = build_model_dir(tmp_path_factory.mktemp("cv3s") / "tiny", seed=2)
    cfg = check_v3_model_dir(model_dir)
    lm = load_v3_llm(model_dir, cfg.llm, end_of_prompt=END_OF_PROMPT)
    sampling = SamplingParams(cfg.llm.top_p, cfg.llm.top_k, cfg.llm.win_size, cfg.llm.tau_r)
    decoder = BatchDecoder(lm, sampling, slots=4, positions=256, use_graphs=False)
    audio = V3AudioStage(load_v3_flow(model_dir, cfg.flow),
                         load_v3_hift(model_dir, cfg.hift, cfg.conv_pre_look_right),
                         HiFTNoise.draw(11, 24000 * 8), torch.device("cpu"))

    def embed(utt: Any) -> torch.Tensor:
        assert isinstance(lm, CosyVoice3LM)
        return lm.build_input(torch.tensor([utt.text_ids]), utt.llm_prompt_tokens)

    running = Scheduler(decoder, audio, embed, DecodeLimits(fixed_tokens=TOKENS))
    running.start()
    yield running
    running.stop()


def _utterance(seed: int) -> V3Utterance:
    gen = torch.Generator().manual_seed(seed)
    prompt = (0, 9, 30)[seed % 3]
    return V3Utterance(
        text_ids=[*torch.randint(10, 300, (6,), generator=gen).tolist(), END_OF_PROMPT,
                  *torch.randint(10, 300, (12,), generator=gen).tolist()],
        tts_token_count=12,
        llm_prompt_tokens=torch.randint(0, 6561, (1, prompt), generator=gen),
        flow_prompt_tokens=torch.randint(0, 6561, (1, prompt), generator=gen),
        prompt_mel=torch.randn(1, 2 * prompt, 80, generator=gen),
        embedding=torch.randn(1, 192, generator=gen),
        seed=seed,
    )


async def _speak(scheduler: Scheduler, utt: V3Utterance) -> tuple[list[int], np.ndarray]:
    job = scheduler.submit([utt], None)
    chunks = []
    try:
        while (item := await job.queue.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, np.ndarray)
            chunks.append(item)
    finally:
        scheduler.cancel(job)
    return list(utt.tokens), np.concatenate(chunks)


async def test_requests_batched_together_get_their_solo_tokens_and_audio(
    scheduler: Scheduler,
) -> None:
    alone = [await _speak(scheduler, _utterance(seed)) for seed in range(3)]
    together = await asyncio.gather(*(_speak(scheduler, _utterance(s)) for s in range(3)))
    for (tokens, audio), (solo_tokens, solo_audio) in zip(together, alone, strict=True):
        assert len(tokens) == TOKENS
        assert tokens == solo_tokens
        # every (unfiltered) token's two mel frames, at 480 samples each
        assert audio.size == solo_audio.size > 0
        assert audio.size % 960 == 0
        assert float(np.abs(audio).max()) > 1e-4
        assert float(np.abs(audio - solo_audio).max()) <= AUDIO_TOLERANCE


async def test_a_failing_request_fails_alone(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = scheduler.audio
    assert isinstance(audio, V3AudioStage)
    original = audio.flow.advance
    bad = _utterance(7)

    def advance(streams: list[Any], *args: Any) -> Any:
        if any(s is bad.flow_stream for s in streams):
            raise RuntimeError("poisoned chunk")
        return original(streams, *args)

    monkeypatch.setattr(audio.flow, "advance", advance)
    results = await asyncio.gather(
        *(_speak(scheduler, _utterance(s)) for s in range(2)), _speak(scheduler, bad),
        return_exceptions=True,
    )
    assert isinstance(results[-1], RuntimeError)
    for result in results[:-1]:
        assert not isinstance(result, BaseException)
        assert result[1].size > 0


@pytest.mark.parametrize("where", ["flow", "vocoder"])
async def test_a_batched_call_that_fails_part_way_leaves_every_request_as_it_was(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A call of several chunks that fails late (as one too large for the GPU's memory would:
    in the flow's last Euler steps, or once the vocoder has advanced every stream) is retried
    chunk by chunk from where each request stood, and every request gets its solo audio."""
    audio = scheduler.audio
    assert isinstance(audio, V3AudioStage)
    alone = [await _speak(scheduler, _utterance(seed)) for seed in range(3)]
    failed: list[int] = []
    if where == "flow":  # the estimator's arguments: x [2B, ...], mu, cond, spks, t [2B], ...
        estimator = audio.flow.estimator
        monkeypatch.setattr(estimator, "forward", out_of_memory_when_batched(
            estimator.forward, lambda x, *a: x.size(0) // 2 if float(a[3][0]) > 0.5 else 1,
            failed))
    else:
        monkeypatch.setattr(v3_pipeline.v3_hift_stream, "advance", out_of_memory_when_batched(
            v3_pipeline.v3_hift_stream.advance, lambda hift, streams, *a: len(streams), failed,
            after_running=True))
    together = await asyncio.gather(*(_speak(scheduler, _utterance(s)) for s in range(3)))
    assert failed, "no call held more than one chunk"
    for (tokens, spoken), (solo_tokens, solo_audio) in zip(together, alone, strict=True):
        assert tokens == solo_tokens
        assert spoken.size == solo_audio.size > 0
        assert float(np.abs(spoken - solo_audio).max()) <= AUDIO_TOLERANCE


async def test_requests_of_one_voice_start_from_its_prompts_prefix(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget for prompt prefixes, the first request of a voice solves its prompt's
    prefix once, the next (alone or together) start from it, and all get the audio they get
    with no prefixes kept."""
    audio = scheduler.audio
    assert isinstance(audio, V3AudioStage)
    voice = _utterance(2)  # a 30-token prompt: a 50-frame prefix

    def of_voice(seed: int) -> V3Utterance:
        return replace(_utterance(seed), llm_prompt_tokens=voice.llm_prompt_tokens,
                       flow_prompt_tokens=voice.flow_prompt_tokens,
                       prompt_mel=voice.prompt_mel, embedding=voice.embedding)

    assert audio.prompt_states.max_bytes == 0
    want = {seed: await _speak(scheduler, of_voice(seed)) for seed in (2, 4)}
    monkeypatch.setattr(audio, "prompt_states", PromptStates(2**30))
    seeded = []
    seed_stream = audio.flow.seed

    def counted(stream: Any, prefix: Any) -> None:
        seeded.append(prefix.frames)
        seed_stream(stream, prefix)

    monkeypatch.setattr(audio.flow, "seed", counted)
    got = [await _speak(scheduler, of_voice(2)),
           *await asyncio.gather(*(_speak(scheduler, of_voice(s)) for s in (2, 4)))]
    assert audio.prompt_states.computed == 1
    assert audio.prompt_states.nbytes > 0
    assert seeded == [50, 50]  # the two after the first, from its 50 frames
    for seed, (tokens, spoken) in zip((2, 2, 4), got, strict=True):
        solo_tokens, solo_audio = want[seed]
        assert tokens == solo_tokens
        assert spoken.size == solo_audio.size > 0
        # tight: on this tiny model a prefix of zeros instead moves the audio by only 1.6e-4
        assert float(np.abs(spoken - solo_audio).max()) <= 1e-6


async def test_later_chunks_of_two_hops_speak_what_chunks_of_one_do(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CosyVoice3's flow and causal vocoder stream what their whole passes give: a request whose
    later chunks take two hops, or four, gets the audio it gets in chunks of one, from fewer
    calls."""
    monkeypatch.setattr(scheduler, "limits", replace(scheduler.limits, fixed_tokens=180))
    calls = first_chunks_per_call(monkeypatch, scheduler.audio)
    spoken = {}
    for hops in (1, 2, 4):
        calls.clear()
        spoken[hops] = (await _speak(scheduler, replace(_utterance(3), later_hops=hops)),
                        len(calls))
    (one_tokens, one_audio), one_calls = spoken[1]
    for hops in (2, 4):
        (tokens, audio), _ = spoken[hops]
        assert tokens == one_tokens
        assert audio.size == one_audio.size > 0
        assert float(np.abs(audio).max()) > 1e-4
        assert float(np.abs(audio - one_audio).max()) <= AUDIO_TOLERANCE
    assert spoken[4][1] < spoken[2][1] < one_calls


async def test_the_vocoders_graph_buckets_speak_what_it_speaks_eagerly(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the vocoder's buckets (run eagerly on the CPU, padded to their lengths), requests
    batched together get the audio the eager vocoder gives them, and the buckets serve calls."""
    audio = scheduler.audio
    assert isinstance(audio, V3AudioStage)
    eager = await asyncio.gather(*(_speak(scheduler, _utterance(s)) for s in range(3)))
    graphs = V3VocoderGraphs(audio.hift, torch.device("cpu"), rows=(1, 2, 4))
    served = []
    run = graphs._run
    graphs._run = lambda bucket: served.append(bucket) or run(bucket)  # type: ignore[method-assign]
    monkeypatch.setattr(audio, "vocoder_graphs", graphs)
    replayed = await asyncio.gather(*(_speak(scheduler, _utterance(s)) for s in range(3)))
    assert {b.first for b in served} == {True, False}
    for (tokens, got), (want_tokens, want) in zip(replayed, eager, strict=True):
        assert tokens == want_tokens
        assert got.size == want.size > 0
        assert float(np.abs(got).max()) > 1e-4
        assert float(np.abs(got - want).max()) <= AUDIO_TOLERANCE


async def test_requests_admitted_steps_apart_get_first_audio_from_one_call(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefilled one per iteration, four requests reach their first chunks a decode step
    apart; an audio call that waits a few steps for them serves them all at once."""
    monkeypatch.setattr(scheduler, "prefill_budget", 1)
    monkeypatch.setattr(scheduler, "gather_steps", 4)
    first_chunks = first_chunks_per_call(monkeypatch, scheduler.audio)
    # seeds with one prompt length: first chunks of one length, due a step apart
    spoken = await asyncio.gather(*(_speak(scheduler, _utterance(s)) for s in (0, 3, 6, 9)))
    assert first_chunks[0] == 4, first_chunks
    for tokens, audio in spoken:
        assert len(tokens) == TOKENS
        assert float(np.abs(audio).max()) > 1e-4
