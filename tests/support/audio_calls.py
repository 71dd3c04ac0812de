"""What the scheduler's audio stage was asked to do, call by call."""

from __future__ import annotations

from typing import Any

import pytest


def first_chunks_per_call(monkeypatch: pytest.MonkeyPatch, audio: Any) -> list[int]:
    """Wrap `audio.run` for the test; the list it returns gains, per call, how many of the
    call's chunks were first chunks (nothing spoken before them)."""
    calls: list[int] = []
    run = audio.run

    def recorded(chunks: list[Any]) -> list[Any]:
        calls.append(sum(1 for c in chunks if c.utterance.offset == 0))
        return run(chunks)

    monkeypatch.setattr(audio, "run", recorded)
    return calls
