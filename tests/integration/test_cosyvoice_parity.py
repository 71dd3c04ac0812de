"""Parity with the upstream implementation (PyPI `cosyvoice2-eu`) on the same random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from testbed import cosyvoice_upstream
from testbed.cosyvoice_models import build_model_dir
from worker.engines.cosyvoice.batch_decode import BatchDecoder, Row
from worker.engines.cosyvoice.engine import CosyVoiceEngine
from worker.engines.cosyvoice.features import prompt_mel, slaney_mel_filters
from worker.engines.cosyvoice.flow import FlowRow
from worker.engines.cosyvoice.llm import SpeechLM
from worker.engines.cosyvoice.pipeline import TOKEN_HOP

pytestmark = pytest.mark.skipif(
    not cosyvoice_upstream.available(), reason="reference cosyvoice2-eu not installed"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cosyvoice") / "tiny")


@pytest.fixture(scope="module")
def upstream(model_dir: Path) -> dict[str, Any]:
    configs = cosyvoice_upstream.load_configs(model_dir)
    llm, flow, hift = configs["llm"], configs["flow"], configs["hift"]
    llm.load_state_dict(torch.load(model_dir / "llm.pt", map_location="cpu"), strict=True)
    flow.load_state_dict(torch.load(model_dir / "flow.pt", map_location="cpu"), strict=True)
    hift.load_state_dict(torch.load(model_dir / "hift.pt", map_location="cpu"), strict=True)
    for m in (llm, flow, hift):
        m.eval()
    return {"llm": llm, "flow": flow, "hift": hift, "feat": configs["feat_extractor"]}


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> CosyVoiceEngine:
    engine = CosyVoiceEngine(model_dir)
    engine.load()
    return engine


def test_llm_logits_match_under_teacher_forcing(
    upstream: dict[str, Any], ours: CosyVoiceEngine
) -> None:
    stages, _ = ours._require()
    mine: SpeechLM = stages.decoder.lm
    ref = upstream["llm"]
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, 300, (1, 12), generator=gen)
    prompt_speech = torch.randint(0, 6561, (1, 7), generator=gen)
    target = torch.randint(0, 6561, (1, 20), generator=gen)
    with torch.inference_mode():
        embeds = mine.build_input(text, prompt_speech)
        got = mine.teacher_forced(embeds, target)
        emb = ref.llm.model.model.embed_tokens
        sos = ref.llm_embedding.weight[0].reshape(1, 1, -1)
        task = ref.llm_embedding.weight[1].reshape(1, 1, -1)
        seq = torch.cat(
            [sos, emb(text), task, ref.speech_embedding(prompt_speech),
             ref.speech_embedding(target)], dim=1,
        )
        hidden, _ = ref.llm(seq, torch.tensor([seq.size(1)]))
        want = ref.llm_decoder(hidden[:, embeds.size(1) - 1 :]).log_softmax(dim=-1)
        # Batched incremental decoding must agree with the full pass too, in any slot.
        decoder = BatchDecoder(mine, stages.decoder.sampling, slots=4, positions=64,
                               use_graphs=False)
        row = Row(slot=2, seed=0, min_len=0, max_len=8)
        decoder.prefill(row, embeds)
        steps = [decoder.last_logp(2).unsqueeze(0)]
        for tok in target[0, :5].tolist():
            row.tokens.append(tok)
            decoder.step([row])
            steps.append(decoder.last_logp(2).unsqueeze(0))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=0), want[0, :6], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("finalize", "streaming"), [(True, False), (False, True)])
def test_flow_mel_matches(
    upstream: dict[str, Any], ours: CosyVoiceEngine, finalize: bool, streaming: bool
) -> None:
    stages, _ = ours._require()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 6561, (1, 31), generator=gen, dtype=torch.int32)
    prompt_tokens = torch.randint(0, 6561, (1, 9), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(1, 18, 80, generator=gen)
    embedding = torch.randn(1, 192, generator=gen)
    want, _ = upstream["flow"].inference(
        token=tokens, token_len=torch.tensor([31]), prompt_token=prompt_tokens,
        prompt_token_len=torch.tensor([9]), prompt_feat=prompt_feat,
        prompt_feat_len=torch.tensor([18]), embedding=embedding, streaming=streaming,
        finalize=finalize,
    )
    got = stages.audio.flow.mel(tokens, prompt_tokens, prompt_feat, embedding, finalize=finalize,
                          streaming=streaming)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_streamed_mel_matches_upstream_at_every_chunk(
    upstream: dict[str, Any], ours: CosyVoiceEngine
) -> None:
    """Chunk by chunk, the incremental flow (only the new frames, from the kept state) gives the
    frames upstream's streaming flow gets by recomputing everything so far."""
    stages, _ = ours._require()
    flow = stages.audio.flow
    gen = torch.Generator().manual_seed(4)
    prompt = 9
    tokens = torch.randint(0, 6561, (100,), generator=gen, dtype=torch.int32)
    prompt_tokens = torch.randint(0, 6561, (prompt,), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(2 * prompt, 80, generator=gen)
    embedding = torch.randn(192, generator=gen)
    look = flow.cfg.pre_lookahead_len
    hop = TOKEN_HOP + (-(-prompt // TOKEN_HOP) * TOKEN_HOP - prompt)
    offset, state, chunks = 0, None, 0
    while True:
        finalize = offset + hop + look > tokens.numel()
        upto = tokens.numel() if finalize else offset + hop + look
        want, _ = upstream["flow"].inference(
            token=tokens[None, :upto], token_len=torch.tensor([upto]),
            prompt_token=prompt_tokens[None], prompt_token_len=torch.tensor([prompt]),
            prompt_feat=prompt_feat[None], prompt_feat_len=torch.tensor([2 * prompt]),
            embedding=embedding[None], streaming=True, finalize=finalize,
        )
        row = FlowRow(tokens[:upto], prompt_tokens, prompt_feat, embedding, finalize, True)
        (got,), (state,) = flow.stream_batch([row], [state])
        torch.testing.assert_close(got, want[0, :, 2 * offset :].float(), atol=1e-4, rtol=1e-4)
        chunks += 1
        if finalize:
            break
        offset += hop
        hop = TOKEN_HOP
    assert chunks == 4
    grid = flow.cfg.estimator.static_chunk_size
    assert state.frames == 2 * (prompt + tokens.numel()) // grid * grid  # what the grid holds


def test_a_stream_continues_only_from_a_grid_line(ours: CosyVoiceEngine) -> None:
    """A kept state ends on the attention grid, where a page ends: a stream whose state ended
    off it would write its next frames into a page it shares (a prompt's) or has filled."""
    flow = ours._require()[0].audio.flow
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 6561, (90,), generator=gen, dtype=torch.int32)
    prompt_tokens = torch.randint(0, 6561, (9,), generator=gen, dtype=torch.int32)
    prompt_feat = torch.randn(18, 80, generator=gen)
    embedding = torch.randn(192, generator=gen)
    row = FlowRow(tokens[:40], prompt_tokens, prompt_feat, embedding, False, True)
    _, (state,) = flow.stream_batch([row], [None])
    assert state.frames % flow.cfg.estimator.static_chunk_size == 0
    forged = flow.flow_pages(10).state(state.frames - 1, state.pages, state.tails)
    later = FlowRow(tokens[:70], prompt_tokens, prompt_feat, embedding, False, True)
    with pytest.raises(ValueError, match="grid"):
        flow.stream_batch([later], [forged])


def test_hift_waveform_matches(upstream: dict[str, Any], ours: CosyVoiceEngine) -> None:
    stages, _ = ours._require()
    mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    want, want_source = upstream["hift"].inference(speech_feat=mel)
    got, got_source = stages.audio.hift(mel, None, torch.Generator().manual_seed(11))
    torch.testing.assert_close(got_source, want_source, atol=1e-5, rtol=1e-4)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(got.abs().max()) > 1e-3


def test_prompt_mel_matches_training_features(upstream: dict[str, Any]) -> None:
    from worker.engines.cosyvoice.config import MelConfig

    wav = torch.sin(torch.arange(24000 * 2) * 0.03) * 0.4
    cfg = MelConfig(1920, 80, 24000, 480, 1920, 0.0, 8000.0)
    want = upstream["feat"](wav.unsqueeze(0)).squeeze(0).transpose(0, 1)
    got = prompt_mel(wav, cfg)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    import librosa

    ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128)
    np.testing.assert_allclose(slaney_mel_filters(16000, 400, 128, 0.0, None).numpy(), ref,
                               atol=1e-6)


def test_batched_step_matches_a_full_pass_per_row(ours: CosyVoiceEngine) -> None:
    """Rows at different positions step together as each would in one causal pass alone."""
    from worker.engines.cosyvoice.decode import PoolDecoder, SlotPool

    backbone = ours._require()[0].decoder.lm.backbone
    pool = SlotPool(backbone, slots=3, positions=32)
    decoder = PoolDecoder(backbone, pool)
    gen = torch.Generator().manual_seed(4)
    hidden = backbone.config.hidden_size
    prompts = [torch.randn(1, n, hidden, generator=gen) for n in (10, 4, 7)]
    for slot, prompt in enumerate(prompts):
        decoder.prefill(prompt, slot)
    positions = torch.tensor([p.size(1) for p in prompts])
    for _ in range(3):
        x = torch.randn(3, 1, hidden, generator=gen)
        got = decoder.step(x, positions)
        for slot in range(3):
            prompts[slot] = torch.cat([prompts[slot], x[slot : slot + 1]], dim=1)
            alone = SlotPool(backbone, slots=1, positions=32)
            want = PoolDecoder(backbone, alone).prefill(prompts[slot], 0)[:, -1]
            torch.testing.assert_close(got[slot], want, atol=1e-5, rtol=1e-4)
        positions += 1
