"""The default Piper voice reaches clients at -18 LUFS (±2 LU) with peaks under -1 dBFS, the
same for short and long texts, speeds and formats, and even from sentence to sentence."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import numpy.typing as npt
import pyloudnorm
import pytest

from tests.integration.test_gateway_integration import worker
from tests.support.audio import decode
from tests.support.processes import RunningProcess

CEILING = 10 ** (-1 / 20)
REQUESTS: list[tuple[dict[str, object], str]] = [
    ({"text": "Hello there, how are you today?", "format": "wav"}, "wav"),
    ({"text": "The quick brown fox jumps over the lazy dog.", "format": "flac"}, "flac"),
    ({"text": "Numbers like 42 and 1999 are read aloud too.", "format": "pcm"}, "pcm"),
    ({"text": "Speaking a little faster changes the pace.", "speed": 1.5, "format": "wav"}, "wav"),
]
LONG = (
    "The first sentence is calm and plain. Then a question comes: is everything ready? "
    "A third sentence, much longer, lists apples, pears, plums and cherries one by one. "
    "The last one ends it."
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProcess]:
    with worker(tmp_path_factory.mktemp("loudness")) as running:
        yield running


def _audio(
    synth: RunningProcess, body: dict[str, object], audio_format: str
) -> tuple[npt.NDArray[np.float64], int]:
    response = httpx.post(f"{synth.url}/v1/synthesize", json=body, timeout=120)
    assert response.status_code == 200, response.text
    rate = int(response.headers["X-Sample-Rate"])
    decoded = decode(response.content, audio_format, rate)
    return np.asarray(decoded.samples, dtype=np.float64), rate


def test_requests_reach_the_target_under_the_ceiling(synth: RunningProcess) -> None:
    for body, audio_format in REQUESTS:
        audio, rate = _audio(synth, body, audio_format)
        loudness = pyloudnorm.Meter(rate).integrated_loudness(audio)
        assert abs(loudness + 18.0) <= 2.0, (body, loudness)
        assert float(np.abs(audio).max()) < CEILING, body


def test_sentences_of_one_text_stay_even(synth: RunningProcess) -> None:
    audio, rate = _audio(synth, {"text": LONG, "format": "pcm_f32le"}, "pcm_f32le")
    meter = pyloudnorm.Meter(rate)
    assert abs(meter.integrated_loudness(audio) + 18.0) <= 2.0
    halves = np.array_split(audio, 2)
    levels = [meter.integrated_loudness(half) for half in halves]
    assert max(levels) - min(levels) <= 3.0, levels
    assert float(np.abs(audio).max()) < CEILING
