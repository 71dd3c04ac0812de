"""How far a stream falls behind a listener's playback: the one definition of an underrun.

The worker applies it to the chunks it sends, the load-test runner to the bytes it receives, so
both sides report the same quantity. The listener is a player that starts at the first chunk,
plays audio at its real rate, pauses when its buffer runs dry and resumes when the next chunk
arrives. A chunk that arrives after the buffer ran dry made the player wait: that wait (wall
time between chunks beyond the audio already sent) is a gap. A stream's figure is its worst
gap; it has an underrun when that exceeds `UNDERRUN_THRESHOLD_S`.
"""

from __future__ import annotations

UNDERRUN_THRESHOLD_S = 0.1
"""A wait longer than this (100 ms) is an audible stall: the stream had an underrun."""


class PlaybackClock:
    """Follows one stream chunk by chunk; `worst_gap_s` is its longest wait so far.

    Times are in seconds on any monotonic clock (the caller's), durations in seconds of audio.
    """

    def __init__(self) -> None:
        self._buffer_ends: float | None = None
        self.worst_gap_s = 0.0
        self.gaps = 0
        self.audio_s = 0.0

    def chunk(self, now: float, audio_s: float) -> float:
        """Record a chunk of `audio_s` seconds arriving at `now`; return the wait it ended."""
        if audio_s <= 0:
            return 0.0
        self.audio_s += audio_s
        if self._buffer_ends is None:
            self._buffer_ends = now + audio_s
            return 0.0
        gap = max(0.0, now - self._buffer_ends)
        if gap > 0:
            self.gaps += 1
            self.worst_gap_s = max(self.worst_gap_s, gap)
        self._buffer_ends = max(self._buffer_ends, now) + audio_s
        return gap

    @property
    def underrun(self) -> bool:
        """True when some wait was longer than `UNDERRUN_THRESHOLD_S`."""
        return self.worst_gap_s > UNDERRUN_THRESHOLD_S
