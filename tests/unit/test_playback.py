"""contract.playback: the listener model behind every underrun figure."""

from __future__ import annotations

import pytest

from contract.playback import UNDERRUN_THRESHOLD_S, PlaybackClock


def test_chunks_ahead_of_playback_never_wait() -> None:
    clock = PlaybackClock()
    for index in range(10):
        assert clock.chunk(now=0.05 * index, audio_s=0.1) == 0.0
    assert clock.worst_gap_s == 0.0
    assert clock.gaps == 0
    assert not clock.underrun
    assert clock.audio_s == pytest.approx(1.0)


def test_a_late_chunk_waits_for_the_time_past_the_buffer() -> None:
    clock = PlaybackClock()
    clock.chunk(now=10.0, audio_s=0.5)  # plays until 10.5
    assert clock.chunk(now=10.75, audio_s=0.5) == pytest.approx(0.25)
    # The player resumed at 10.75, so the buffer now ends at 11.25, not 11.0.
    assert clock.chunk(now=11.2, audio_s=0.5) == 0.0
    assert clock.chunk(now=11.8, audio_s=0.1) == pytest.approx(0.05)
    assert clock.worst_gap_s == pytest.approx(0.25)
    assert clock.gaps == 2
    assert clock.underrun


def test_buffered_audio_absorbs_a_slow_chunk() -> None:
    clock = PlaybackClock()
    clock.chunk(now=0.0, audio_s=2.0)
    assert clock.chunk(now=1.9, audio_s=0.1) == 0.0
    assert not clock.underrun


def test_threshold_is_exclusive() -> None:
    clock = PlaybackClock()
    clock.chunk(now=0.0, audio_s=1.0)
    clock.chunk(now=1.0 + UNDERRUN_THRESHOLD_S, audio_s=0.5)
    assert clock.worst_gap_s == pytest.approx(UNDERRUN_THRESHOLD_S)
    clock.worst_gap_s = UNDERRUN_THRESHOLD_S  # exactly at the line: no underrun
    assert not clock.underrun


def test_empty_chunks_change_nothing() -> None:
    clock = PlaybackClock()
    assert clock.chunk(now=0.0, audio_s=0.0) == 0.0
    clock.chunk(now=5.0, audio_s=0.1)  # the first real chunk starts playback
    assert clock.worst_gap_s == 0.0
