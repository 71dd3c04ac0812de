"""No Piper request changes another's audio: phonemes and audio depend on the request alone.

The reference is a freshly started process (tests.support.fresh_piper): each target text's
phonemes as the first espeak-ng call of a process, and its audio from a newly loaded engine.
The engine under test serves a variety of other texts before each target, one after the other
and at the same instant, and must give the target exactly the fresh bytes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.audio import decode
from tests.support.fresh_piper import SEED
from tests.support.processes import REPO_ROOT
from worker.engines.base import EngineRequest
from worker.engines.piper import PiperEngine

TARGETS = (
    "Hello there, friend.",
    "The quick brown fox jumps over the lazy dog",
    "It costs 12 dollars, not 3.50!",
)
# Odd endings, punctuation runs, numbers, other scripts, symbols; all free of control chars.
PREFIXES = (
    "Okay..",
    "Okay..\u00a0",
    "..",
    "Wait...",
    "Really?!..",
    "3..",
    "1.5.",
    "U.S.A..",
    "e.g..",
    "(aside..)",
    '"quoted.."',
    "a;..",
    "100,000.00..",
    "\u65e5\u672c\u8a9e\u3067\u3059\u3002",
    "\u041f\u0440\u0438\u0432\u0435\u0442..",
    "\u0645\u0631\u062d\u0628\u0627..",
    "\U0001f642..",
    "\ufb01 ligature..",
    "Hmm \u2014",
    "#..",
    "http://example.com/a..",
    "'",
    "-",
    "?..",
    "[[ h\u025bl ]]..",
)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list[list[str]]], list[bytes]]:
    out = tmp_path_factory.mktemp("fresh_piper")
    subprocess.run(
        [sys.executable, "-m", "tests.support.fresh_piper", str(out), *TARGETS],
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
    )
    phonemes = json.loads((out / "phonemes.json").read_text())
    audio = [(out / f"audio_{index}.f32").read_bytes() for index in range(len(TARGETS))]
    return phonemes, audio


@pytest.fixture(scope="module")
def engine() -> PiperEngine:
    loaded = PiperEngine(threads=1)
    loaded.load()
    return loaded


def request(text: str) -> EngineRequest:
    return EngineRequest(text=text, voice="joe", speed=1.0, seed=SEED)


async def synthesize(engine: PiperEngine, text: str) -> bytes:
    return b"".join([chunk.tobytes() async for chunk in engine.stream(request(text))])


def test_the_reference_is_real_speech(fresh: tuple[list[list[list[str]]], list[bytes]]) -> None:
    for audio in fresh[1]:
        decoded = decode(audio, "pcm_f32le", 22050)
        assert decoded.duration > 0.8
        assert decoded.rms > 0.01


@pytest.mark.parametrize("index", range(len(PREFIXES)))
async def test_audio_after_another_request_is_a_fresh_workers(
    engine: PiperEngine, fresh: tuple[list[list[list[str]]], list[bytes]], index: int
) -> None:
    target = index % len(TARGETS)
    await synthesize(engine, PREFIXES[index])
    assert await synthesize(engine, TARGETS[target]) == fresh[1][target]


@pytest.mark.parametrize("index", range(0, len(PREFIXES), 3))
async def test_audio_beside_a_concurrent_request_is_a_fresh_workers(
    engine: PiperEngine, fresh: tuple[list[list[list[str]]], list[bytes]], index: int
) -> None:
    target = index % len(TARGETS)
    for _ in range(2):  # the other request's text phonemized first, then second
        _, audio = await asyncio.gather(
            synthesize(engine, PREFIXES[index]), synthesize(engine, TARGETS[target])
        )
        assert audio == fresh[1][target]


control_free = st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn"))
words = st.sampled_from(["Okay", "so", "3", "1.5", "e.g", "Dr", "\u00e9t\u00e9", "\u65e5\u672c"])
punctuation_run = st.one_of(
    st.text(".?!,;:-\u2026 \"')", min_size=1, max_size=4),
    st.sampled_from(["..", " ..", ")..", '"..', "...", ". ."]),
)
odd_text = st.one_of(
    st.text(control_free, max_size=24),
    st.tuples(st.lists(words, max_size=3).map(" ".join), punctuation_run).map("".join),
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prefix=odd_text, target=st.integers(0, len(TARGETS) - 1))
def test_phonemes_never_depend_on_the_previous_text(
    engine: PiperEngine,
    fresh: tuple[list[list[list[str]]], list[bytes]],
    prefix: str,
    target: int,
) -> None:
    phonemizer = engine._voice("joe").phonemizer
    phonemizer.phonemize(prefix)
    assert phonemizer.phonemize(TARGETS[target]) == fresh[0][target]

