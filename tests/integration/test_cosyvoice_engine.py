"""The cosyvoice engine on a tiny random-weight model: every mode streams, bad input is refused,
failures reach the caller, cancellation stops decoding, and requests do not share state."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from contract.errors import ErrorCode, ServiceError
from testbed.cosyvoice_models import build_model_dir
from worker.engines import create_engine
from worker.engines.base import EngineRequest
from worker.engines.cosyvoice.config import ModelDirError
from worker.engines.cosyvoice.engine import CosyVoiceEngine

SR = 24000
BATCH_AUDIO_TOLERANCE = 1e-3
"""Largest sample difference allowed between a request served alone and within a batch."""
TEXT = "Hello there, this is a streaming test of the speech engine today."


def _prompt(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cv") / "tiny", eos_bias=4.5)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> CosyVoiceEngine:
    built = create_engine("cosyvoice", model_dir=str(model_dir))
    assert isinstance(built, CosyVoiceEngine)
    built.load()
    built.warm_up()
    return built


async def _collect(engine: CosyVoiceEngine, request: EngineRequest) -> list[np.ndarray]:
    return [chunk async for chunk in engine.stream(request)]


def _check_audio(chunks: list[np.ndarray], text_tokens: int) -> np.ndarray:
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32
    assert np.all(np.isfinite(audio))
    assert np.abs(audio).max() <= 1.0
    assert float(np.sqrt(np.mean(audio**2))) > 1e-3
    # Speech tokens run at 25 Hz; the model emits 2-20 of them per text token.
    seconds = audio.size / SR
    assert 2 * text_tokens / 25 * 0.5 <= seconds <= 20 * text_tokens / 25 + 1
    return audio


def _text_tokens(engine: CosyVoiceEngine, text: str) -> int:
    return engine._require()[1].count_tokens(text)


@pytest.mark.parametrize(
    "kind", ["sft", "zero_shot", "cross_lingual", "instruct2", "instruct2_speaker"]
)
async def test_every_mode_streams_audio_while_decoding(
    engine: CosyVoiceEngine, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = TEXT + " " + TEXT  # at least 2 x 30 speech tokens: more than the first chunk needs
    fields: dict[str, Any] = {"text": text, "voice": "english_male", "speed": 1.0, "seed": 5}
    if kind in ("zero_shot", "cross_lingual", "instruct2"):
        fields |= {"voice": "", "prompt_audio": _prompt(), "prompt_sample_rate": 16000}
    if kind == "zero_shot":
        fields["prompt_text"] = "A short prompt transcript."
    if kind.startswith("instruct2"):
        fields["instruction"] = "Speak slowly and happily."
    decoder = engine._require()[0].decoder
    first_chunk = threading.Event()
    original = decoder.step
    held = {"steps": 0}

    def gated_step(rows: list[Any]) -> list[int]:
        # Decoding pauses at step 40 until the first audio has reached the caller: audio that
        # only came once every token was decoded would never open the gate.
        held["steps"] += 1
        if held["steps"] == 40:
            held["opened"] = first_chunk.wait(timeout=60)
        return original(rows)

    monkeypatch.setattr(decoder, "step", gated_step)
    chunks = []
    async for chunk in engine.stream(EngineRequest(**fields)):
        first_chunk.set()
        chunks.append(chunk)
    assert held.get("opened") is True
    assert len(chunks) >= 2
    _check_audio(chunks, _text_tokens(engine, text))


async def test_chinese_text_is_normalised_and_spoken(engine: CosyVoiceEngine) -> None:
    text = "今天是2024年，气温25度。我们出发吧！"  # noqa: RUF001
    chunks = await _collect(engine, EngineRequest(text=text, voice="中文女", speed=1.0, seed=1))
    spoken = "今天是二千零二十四年，气温二十五度。我们出发吧！"  # noqa: RUF001
    _check_audio(chunks, _text_tokens(engine, spoken))


async def test_same_seed_same_audio_alone_and_close_when_batched(
    engine: CosyVoiceEngine,
) -> None:
    request = EngineRequest(text=TEXT, voice="english_male", speed=1.0, seed=42,
                            prompt_audio=_prompt(), prompt_sample_rate=16000)
    other = EngineRequest(text="Something else entirely, and a little longer than that.",
                          voice="中文女", speed=1.0, seed=7)
    solo = np.concatenate(await _collect(engine, request))
    np.testing.assert_array_equal(np.concatenate(await _collect(engine, request)), solo)
    together = await asyncio.gather(_collect(engine, request), _collect(engine, other),
                                    _collect(engine, request))
    for audio in (np.concatenate(together[0]), np.concatenate(together[2])):
        assert audio.shape == solo.shape  # the same speech tokens
        np.testing.assert_allclose(audio, solo, atol=BATCH_AUDIO_TOLERANCE)


async def test_registered_voice_reuses_features(engine: CosyVoiceEngine) -> None:
    data = engine.compute_voice(_prompt(2.0, 44100), 44100, "A short prompt transcript.")
    engine.add_voice("v-123", data)
    by_id = np.concatenate(await _collect(
        engine, EngineRequest(text=TEXT, voice="v-123", speed=1.0, seed=3)))
    direct = np.concatenate(await _collect(engine, EngineRequest(
        text=TEXT, voice="", speed=1.0, seed=3, prompt_audio=_prompt(2.0, 44100),
        prompt_sample_rate=44100, prompt_text="A short prompt transcript.")))
    np.testing.assert_array_equal(by_id, direct)
    engine.remove_voice("v-123")
    with pytest.raises(ServiceError) as e:
        await _collect(engine, EngineRequest(text=TEXT, voice="v-123", speed=1.0, seed=3))
    assert e.value.code == ErrorCode.UNKNOWN_VOICE


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"prompt_audio": _prompt(0.2)}, ErrorCode.PROMPT_TOO_SHORT),
        ({"prompt_audio": _prompt(31.0, 8000), "prompt_sample_rate": 8000},
         ErrorCode.PROMPT_TOO_LONG),
        ({"prompt_audio": np.zeros(32000, dtype=np.float32)}, ErrorCode.PROMPT_SILENT),
        ({"prompt_audio": np.full(32000, np.nan, dtype=np.float32)}, ErrorCode.PROMPT_NOT_AUDIO),
        ({"voice": "nobody"}, ErrorCode.UNKNOWN_VOICE),
        ({"prompt_audio": _prompt(), "prompt_text": "words", "instruction": "be happy"},
         ErrorCode.INSTRUCTION_UNSUPPORTED),
    ],
)
async def test_bad_input_is_refused_before_audio(
    engine: CosyVoiceEngine, fields: dict[str, Any], code: ErrorCode
) -> None:
    base: dict[str, Any] = {"text": TEXT, "voice": "english_male", "speed": 1.0, "seed": 1,
                            "prompt_sample_rate": 16000}
    stream = engine.stream(EngineRequest(**(base | fields)))
    with pytest.raises(ServiceError) as e:
        await anext(stream)
    assert e.value.code == code


async def test_failure_mid_decoding_reaches_the_caller(
    engine: CosyVoiceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = engine._require()[0].decoder
    original = decoder.step
    calls = {"n": 0}

    def failing_step(rows: list[Any]) -> list[int]:
        calls["n"] += 1
        if calls["n"] > 40:
            raise RuntimeError("device lost")
        return original(rows)

    monkeypatch.setattr(decoder, "step", failing_step)
    request = EngineRequest(text=TEXT + " " + TEXT, voice="english_male", speed=1.0, seed=9)

    async def consume() -> None:
        async with asyncio.timeout(120):
            await _collect(engine, request)

    with pytest.raises(RuntimeError) as e:
        await consume()
    assert "device lost" in repr(e.value.__cause__)


async def test_cancellation_stops_decoding(
    engine: CosyVoiceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = engine._require()[0]
    decoder = scheduler.decoder
    original = decoder.step
    seen: list[int] = []
    cancelled = threading.Event()
    after_cancel = {"steps": 0}

    def counting_step(rows: list[Any]) -> list[int]:
        seen.append(len(rows))
        if cancelled.is_set():
            after_cancel["steps"] += 1
        return original(rows)

    monkeypatch.setattr(decoder, "step", counting_step)
    stream = engine.stream(EngineRequest(text=TEXT + " " + TEXT, voice="english_male",
                                         speed=1.0, seed=2))
    await anext(stream)
    await stream.aclose()
    cancelled.set()
    assert await asyncio.to_thread(scheduler.wait_idle, 30.0)
    # At most the step already under way when the request left ran for it.
    assert after_cancel["steps"] <= 1
    assert seen


def test_missing_or_mismatched_files_are_named(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "campplus.onnx").unlink()
    with pytest.raises(ModelDirError, match=r"campplus\.onnx"):
        CosyVoiceEngine(broken).load()
    shutil.copy(model_dir / "campplus.onnx", broken / "campplus.onnx")
    state = torch.load(broken / "flow.pt")
    state["encoder_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, broken / "flow.pt")
    with pytest.raises(ModelDirError, match=r"flow\.pt.*encoder_proj\.weight"):
        CosyVoiceEngine(broken).load()


async def test_speed_changes_duration(engine: CosyVoiceEngine) -> None:
    base = {"text": TEXT, "voice": "english_male", "seed": 4}
    normal = np.concatenate(await _collect(engine, EngineRequest(speed=1.0, **base)))
    fast = np.concatenate(await _collect(engine, EngineRequest(speed=2.0, **base)))
    assert 0.4 < fast.size / normal.size < 0.65
