"""Pure functions of the cosyvoice engine: config, weight folding, text, sampling, voices,
spectra."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from worker.engines.cosyvoice.capacity import (
    WORKING_SHARE,
    StreamCost,
    default_audio_rows,
    flow_frame_bytes,
    streams_that_fit,
)
from worker.engines.cosyvoice.config import read_yaml
from worker.engines.cosyvoice.engine import (
    GEMM_WORKSPACE_SETTINGS,
    SpeechEngine,
    turn_off_gemm_workspaces,
)
from worker.engines.cosyvoice.frontend import VoicePrompt
from worker.engines.cosyvoice.hift import dft_bases, inverse_stft, stft
from worker.engines.cosyvoice.pipeline import Utterance
from worker.engines.cosyvoice.sampling import SamplingParams, sample, uniform
from worker.engines.cosyvoice.text import (
    chinese_number,
    english_number,
    normalize,
    split_sentences,
)
from worker.engines.cosyvoice.weights import fold_weight_norm


def test_yaml_refs_and_expressions_resolve(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "rate: 25\nratio: 2\nsigma: 1e-06\n"
        "model: !new:some.module.Class\n"
        "    size: !ref <rate>\n"
        "    chunk: !ref <rate> * <ratio>\n"
        "    inner: !name:other.fn\n"
        "        k: 3\n"
    )
    tree = read_yaml(path)
    assert tree["model"]["size"] == 25
    assert tree["model"]["chunk"] == 50
    assert tree["model"]["inner"]["k"] == 3
    assert tree["model"].target == "some.module.Class"
    assert tree["sigma"] == pytest.approx(1e-6)


@pytest.mark.parametrize(
    ("g_key", "v_key"),
    [("c.weight_g", "c.weight_v"),
     ("c.parametrizations.weight.original0", "c.parametrizations.weight.original1")],
)
def test_weight_norm_is_folded(g_key: str, v_key: str) -> None:
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(3, 4, 5))
    state = {g_key: conv.parametrizations.weight.original0.detach(),
             v_key: conv.parametrizations.weight.original1.detach(), "c.bias": conv.bias.detach()}
    folded = fold_weight_norm(state)
    assert set(folded) == {"c.weight", "c.bias"}
    torch.testing.assert_close(folded["c.weight"], conv.weight.detach())


def test_numbers_are_spelled() -> None:
    assert english_number(1234) == "one thousand two hundred thirty four"
    assert chinese_number(2024) == "二千零二十四"
    assert chinese_number(15) == "十五"
    assert normalize("It costs 3.5 dollars & 20%") == (
        "It costs three point five dollars and twenty percent"
    )
    assert normalize("今天是2024年") == "今天是二千零二十四年"


def test_long_text_is_split_in_order() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    pieces = split_sentences(text, lambda s: len(s.split()), max_tokens=30, min_tokens=20)
    assert len(pieces) > 3
    assert all(len(p.split()) <= 30 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    no_stops = "word " * 200
    assert all(len(p.split()) <= 30 for p in
               split_sentences(no_stops, lambda s: len(s.split()), 30, 20))


def _draw(logp: torch.Tensor, seeds: list[int], history: list[list[int]] | None = None,
          allow_eos: bool = False, counter: int = 0, eos: int = 10) -> list[int]:
    n = len(seeds)
    rows = logp.expand(n, -1)
    hist = torch.tensor(history) if history is not None else torch.full((n, 10), -1)
    return sample(rows, hist, torch.tensor(seeds), torch.full((n,), counter),
                  torch.full((n,), allow_eos), SamplingParams(), eos=eos).tolist()


def test_uniform_draws_are_spread_and_pure() -> None:
    seeds = torch.arange(20000) * 7919
    u = uniform(seeds, torch.zeros_like(seeds), 0)
    assert float(u.min()) >= 0.0
    assert float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, uniform(seeds, torch.zeros_like(seeds), 0))
    assert not torch.equal(u, uniform(seeds, torch.ones_like(seeds), 0))
    assert not torch.equal(u, uniform(seeds, torch.zeros_like(seeds), 1))


def test_nucleus_keeps_top_p_within_top_k() -> None:
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05] + [0.0] * 7])
    logp = probs.clamp(min=1e-12).log()
    draws = _draw(logp, list(range(3000)))
    counts = np.bincount(draws, minlength=12)
    assert counts[3:].sum() == 0
    assert counts[0] / 3000 == pytest.approx(0.5 / 0.85, abs=0.04)
    assert counts[2] / 3000 == pytest.approx(0.15 / 0.85, abs=0.03)


def test_repeated_token_is_drawn_again_from_the_full_distribution() -> None:
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05] + [0.0] * 7])
    logp = probs.clamp(min=1e-12).log()
    history = [[0] * 10 for _ in range(3000)]
    counts = np.bincount(_draw(logp, list(range(3000)), history), minlength=12)
    # Token 0 fills the window: whenever the nucleus picks it, the full distribution decides.
    assert counts[3] > 0
    assert counts[0] / 3000 == pytest.approx(0.5 / 0.85 * 0.5, abs=0.04)


def test_sampling_is_seeded_per_row_and_respects_eos() -> None:
    logp = torch.randn(1, 20, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    logp[0, 10] = 5.0
    draws = _draw(logp, list(range(30)))
    assert all(d < 10 for d in draws)
    assert draws == _draw(logp, list(range(30)))
    # A row's token depends on its own seed only, not on which rows share the batch.
    assert [_draw(logp, [s])[0] for s in (3, 17, 29)] == [draws[3], draws[17], draws[29]]
    assert _draw(logp, [0], allow_eos=True) == [10]


def test_voice_prompt_round_trips() -> None:
    prompt = VoicePrompt(text="你好", speech_tokens=torch.tensor([[1, 2, 3]], dtype=torch.int32),
                         embedding=torch.randn(1, 192), mel=torch.randn(1, 6, 80))
    back = VoicePrompt.from_bytes(prompt.to_bytes())
    assert back.text == "你好"
    torch.testing.assert_close(back.speech_tokens, prompt.speech_tokens)
    torch.testing.assert_close(back.mel, prompt.mel)


def test_each_stages_capture_logs_the_memory_its_graphs_keep(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    engine = SpeechEngine(model_dir=tmp_path)
    engine.device = torch.device("cuda")
    reserved = iter([2 * 2**30, 5 * 2**30 + 2**29])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: next(reserved))
    captured = SimpleNamespace(graphs=SimpleNamespace(capture=lambda: None))
    with caplog.at_level("INFO", logger="worker.engines.cosyvoice.engine"):
        engine._capture_each(((captured, "graphs", "vocoder"),))
    assert re.search(r"Captured the vocoder's graphs in [\d.]+ s: 3\.50 GiB more reserved",
                     caplog.text)


def test_stated_capacity_fits_the_memory_left() -> None:
    frame = flow_frame_bytes(steps=10, attention_blocks=56, channels=256, element_size=2)
    assert frame == 573_440  # 0.57 MB per mel frame on the released model in bf16
    # keys and values x 24 layers x 2 KV heads x 3072 positions x head size 64, bf16
    cost = StreamCost(kv_row_bytes=2 * 24 * 2 * 3072 * 64 * 2, flow_frame_bytes=frame,
                      frames_per_second=50)
    total = 140 * 2**30
    assert streams_that_fit(104 * 2**30, total, cost, limit=128) == 128
    shared = streams_that_fit(60 * 2**30, total, cost, limit=128)
    assert 40 < shared < 128
    assert shared * cost.bytes() <= 60 * 2**30 - WORKING_SHARE * total
    assert streams_that_fit(2**30, total, cost, limit=128) == 1
    paged = StreamCost(kv_row_bytes=1000, flow_frame_bytes=frame, frames_per_second=50,
                       frame_quantum=256)
    assert paged.bytes() == 1000 + 768 * frame  # 15 s, 750 frames, in whole 256-frame pages


@pytest.mark.parametrize(("device", "total_gib", "rows"),
                         [("cpu", None, 64), ("cuda", 139.8, 64), ("cuda", 79.2, 32)])
def test_audio_rows_default_to_half_on_a_gpu_of_less_than_100_gib(
    monkeypatch: pytest.MonkeyPatch, device: str, total_gib: float | None, rows: int
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        total_memory=int((total_gib or 0) * 2**30)))
    assert default_audio_rows(torch.device(device)) == rows


@pytest.mark.parametrize(("n_fft", "hop"), [(16, 4), (16, 8), (64, 16)])
def test_spectra_match_torch(n_fft: int, hop: int) -> None:
    window = torch.hann_window(n_fft, periodic=True)
    forward, inverse = dft_bases(n_fft)
    bins = n_fft // 2 + 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 480, generator=gen)
    expected = torch.stft(x, n_fft, hop, n_fft, window=window, return_complex=True)
    spectrum = stft(x, n_fft, hop, window, forward)
    torch.testing.assert_close(spectrum[:, :bins], expected.real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spectrum[:, bins:], expected.imag, atol=1e-5, rtol=1e-5)
    spec = torch.randn(3, n_fft // 2 + 1, 120, dtype=torch.cfloat, generator=gen)
    expected_wave = torch.istft(spec, n_fft, hop, n_fft, window=window)
    wave = inverse_stft(torch.cat([spec.real, spec.imag], dim=1), n_fft, hop, window, inverse)
    torch.testing.assert_close(wave, expected_wave, atol=1e-6, rtol=1e-5)


def test_gemm_workspaces_are_turned_off_for_cuda_only_and_an_operators_value_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in GEMM_WORKSPACE_SETTINGS:
        monkeypatch.setenv(name, "")  # so that the test's own settings are undone after it
        monkeypatch.delenv(name)
    turn_off_gemm_workspaces(torch.device("cpu"))
    assert not any(name in os.environ for name in GEMM_WORKSPACE_SETTINGS)
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "1024")
    turn_off_gemm_workspaces(torch.device("cuda", 1))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "1024"


@pytest.mark.parametrize("rows", [0, 65])
def test_encoder_graph_rows_outside_the_audio_calls_rows_are_refused(rows: int) -> None:
    from worker.engines.cosyvoice import create_engine

    with pytest.raises(ValueError, match="encoder_graph_rows"):
        create_engine(model_dir="/nonexistent", encoder_graph_rows=rows)


@pytest.mark.parametrize(("audio_rows", "encoder_rows"), [(None, 64), (32, 32)])
def test_encoder_graphs_cover_the_audio_calls_rows_by_default(
        audio_rows: int | None, encoder_rows: int) -> None:
    from worker.engines.cosyvoice import CosyVoiceEngine

    options = {} if audio_rows is None else {"max_audio_rows": audio_rows}
    engine = CosyVoiceEngine(model_dir="/nonexistent", **options)
    assert engine.encoder_graph_rows == encoder_rows
    assert engine.vocoder_graphs


def test_the_decoding_loop_steps_on_the_high_priority_stream_while_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The decoding loop holds a stream of each priority and runs each iteration on the one
    `decode_priority` names then, so a running engine takes a change at its next step; the
    audio loop's stream is of the normal priority."""
    from worker.engines.cosyvoice.scheduler import Scheduler

    made: list[int] = []
    current: list[int] = []

    class FakeStream:
        def __init__(self, device: torch.device, priority: int) -> None:
            self.priority = priority
            made.append(priority)

    @contextlib.contextmanager
    def entered(stream: FakeStream) -> Iterator[None]:
        current.append(stream.priority)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", entered)
    decoder = SimpleNamespace(device=torch.device("cuda"), lm=SimpleNamespace(eos=0),
                              slots=1)
    scheduler = Scheduler(decoder, None, None, None)  # type: ignore[arg-type]
    scheduler._decoding = [SimpleNamespace(row=object(), live=True)]  # type: ignore[list-item]
    monkeypatch.setattr(scheduler, "_evict", lambda: None)
    monkeypatch.setattr(scheduler, "_admit", list)
    stepped: list[int] = []

    def step(rows: list[object]) -> None:
        stepped.append(current[-1])
        scheduler.decode_priority = not scheduler.decode_priority
        scheduler._stopping = len(stepped) == 3

    monkeypatch.setattr(scheduler, "_step", step)
    scheduler._decode_loop()
    assert sorted(made) == [-1, 0]
    assert stepped == [0, -1, 0]
    made.clear()
    scheduler._audio_loop()
    assert made == [0]


@pytest.mark.parametrize(("audio_left_s", "waits"), [(0.1, False), (5.0, True)])
def test_an_audio_call_waits_for_due_first_chunks_unless_a_listener_is_about_to_run_out(
    audio_left_s: float, waits: bool,
) -> None:
    """A call serving a stream under way looks for first chunks due within its gather steps
    (and waits for them, here until its timeout: no decoding runs) only when that stream's
    listener has more audio left than the wait could take."""
    import asyncio
    import time
    from types import SimpleNamespace

    from worker.engines.cosyvoice.batch_decode import Row
    from worker.engines.cosyvoice.scheduler import Job, Scheduler

    asked: list[Utterance] = []

    def tokens_due(utt: Utterance) -> int:
        asked.append(utt)
        return 2

    chunk = SimpleNamespace()
    audio = SimpleNamespace(tokens_due=tokens_due, finished=lambda utt: False,
                            next_chunk=lambda utt: chunk if utt.offset else None)
    decoder = SimpleNamespace(device=torch.device("cpu"), lm=SimpleNamespace(eos=0), slots=2)
    scheduler = Scheduler(decoder, audio, None, None, gather_steps=4)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        under_way = Job([_utterance(0, None, offset=25)], loop, None,
                        first_audio_at=time.monotonic() - 1.0, audio_s=1.0 + audio_left_s)
        starting = Job([_utterance(0, None)], loop, None,
                       row=Row(slot=1, seed=0, min_len=0, max_len=0))
        scheduler._speaking = [under_way, starting]
        ready = [(under_way, chunk)]
        with scheduler._lock:
            assert scheduler._gather_first_chunks(ready) == ready  # type: ignore[arg-type]
    finally:
        loop.close()
    assert (asked == [starting.utterances[0]] * len(asked) and len(asked) > 0) == waits


def test_dit_graphs_are_refused_for_cosyvoice2() -> None:
    from worker.engines.cosyvoice import create_engine

    for value in (True, False):
        with pytest.raises(ValueError, match="dit_graphs is CosyVoice3's"):
            create_engine(model_dir="/nonexistent", dit_graphs=value)


def _utterance(prompt_tokens: int, first_chunk: int | None, offset: int = 0,
               later_hops: int = 1) -> Utterance:
    prompt = torch.zeros(1, prompt_tokens, dtype=torch.int32)
    return Utterance(text_ids=[], tts_token_count=0, llm_prompt_tokens=prompt,
                     flow_prompt_tokens=prompt, prompt_mel=torch.zeros(1, 2 * prompt_tokens, 80),
                     embedding=torch.zeros(1, 192), seed=0, first_chunk=first_chunk,
                     offset=offset, later_hops=later_hops)


@pytest.mark.parametrize(("prompt_tokens", "first_chunk", "hops"), [
    (75, None, [25, 25, 50, 50]), (80, None, [45, 25, 50, 50]), (0, 7, [7, 18, 25, 50, 50]),
    (51, 10, [10, 14, 25, 50])])
def test_later_chunks_grow_to_two_hops_once_a_hop_past_the_first_is_spoken(
        prompt_tokens: int, first_chunk: int | None, hops: list[int]) -> None:
    """With `later_hops=2` chunks end on the grid as with one, and take two of its hops from
    the first chunk that starts a whole hop or more after the first chunk's end."""
    offset = 0
    for want in hops:
        assert _utterance(prompt_tokens, first_chunk, offset, later_hops=2).hop() == want
        offset += want
        assert (prompt_tokens + offset) % 25 == 0 or offset == first_chunk


@pytest.mark.parametrize(("prompt_tokens", "released", "at_most_25", "at_most_10"),
                         [(0, 25, 25, 10), (75, 25, 25, 10), (80, 45, 25, 10), (51, 49, 25, 10)])
def test_the_first_chunk_aligns_prompt_and_chunk_on_the_grid_as_released(
        prompt_tokens: int, released: int, at_most_25: int, at_most_10: int) -> None:
    """By default the first chunk is a hop plus the prompt's padding to the 25-token grid, as
    upstream streams; `first_chunk_tokens` caps it; later chunks end on the grid."""
    assert _utterance(prompt_tokens, None).hop() == released
    assert (prompt_tokens + released) % 25 == 0
    assert _utterance(prompt_tokens, 25).hop() == at_most_25
    assert _utterance(prompt_tokens, 10).hop() == at_most_10
    after = _utterance(prompt_tokens, 10, offset=10)
    assert (prompt_tokens + 10 + after.hop()) % 25 == 0
