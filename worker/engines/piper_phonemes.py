"""Phonemization that no request can influence: every call starts from espeak-ng's clean state.

espeak-ng is one process-wide translator, and it carries state from one call to the next: text
ending in `..` leaves the second dot pending, and the next text phonemized, whoever sent it,
starts with a spoken "dot". Re-initializing espeak-ng or re-selecting the voice does
not clear it. `StatelessPhonemizer` therefore

- runs every espeak-ng call of the process under one lock (espeak-ng is not thread-safe, and
  two requests' calls must not interleave), and
- after each call drains whatever the text left behind (an empty call consumes a pending
  clause), then proves the translator is clean: a probe text must phonemize exactly as it did
  on the first call of the process. A translator that stays dirty after a few drains is a
  fatal engine error, not a request's problem.

So the phonemes of a text depend on that text alone, and a request's audio is byte-identical to
the same request on a freshly started worker.
"""

from __future__ import annotations

import threading
from typing import Protocol

PROBE_TEXT = "a, 1."
"""Short, but it exercises a word, a clause mark, a number and a full stop."""
MAX_DRAINS = 4

_ESPEAK_LOCK = threading.Lock()
"""Every espeak-ng call of this process goes through this lock (all voices share espeak-ng)."""


class Phonemizes(Protocol):
    def phonemize(self, text: str) -> list[list[str]]: ...


class PhonemizerStateError(RuntimeError):
    """espeak-ng's state could not be brought back to clean: the engine cannot go on."""


class StatelessPhonemizer:
    """Wraps a Piper voice's `phonemize` so that no call sees what an earlier one left."""

    def __init__(self, voice: Phonemizes) -> None:
        self._voice = voice
        with _ESPEAK_LOCK:
            # Called at load, before any request: the translator is as a fresh process has it.
            self._probe = voice.phonemize(PROBE_TEXT)
            self._drain()  # the probe itself must leave nothing behind

    def phonemize(self, text: str) -> list[list[str]]:
        """Phonemes by sentence; thread-safe, and independent of every earlier call."""
        with _ESPEAK_LOCK:
            try:
                return self._voice.phonemize(text)
            finally:
                self._drain()

    def _drain(self) -> None:
        for _ in range(MAX_DRAINS):
            self._voice.phonemize("")
            if self._voice.phonemize(PROBE_TEXT) == self._probe:
                return
        raise PhonemizerStateError("espeak-ng keeps state between calls after draining it")
