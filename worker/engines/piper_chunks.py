"""Cut over-long Piper sentences into pieces the voice synthesizes one at a time.

Piper synthesizes a whole sentence in one ONNX run, so a long sentence (or a text with no full
stops) delays the first audio, holds memory in proportion to its length, and cannot be cancelled
until it is done. Pieces of at most `limit` phonemes bound all three. A cut goes after the last
clause mark (, ; :) in the second half of the window, else after the last word there, else at
the limit; sentences within the limit are left whole, so ordinary prosody is untouched.
"""

from __future__ import annotations

CLAUSE_MARKS = frozenset({",", ";", ":"})
WORD_BREAK = " "


def split_phonemes(phonemes: list[str], limit: int) -> list[list[str]]:
    """Pieces of `phonemes`, each at most `limit` long, with no blank edges; none empty."""
    if limit < 2:
        raise ValueError("limit must be at least 2")
    pieces: list[list[str]] = []
    rest = _strip(phonemes)
    while len(rest) > limit:
        cut = _cut_point(rest[:limit])
        pieces.append(_strip(rest[:cut]))
        rest = _strip(rest[cut:])
    if rest:
        pieces.append(rest)
    return [piece for piece in pieces if piece]


def _cut_point(window: list[str]) -> int:
    half = len(window) // 2
    for marks in (CLAUSE_MARKS, frozenset({WORD_BREAK})):
        for index in range(len(window) - 1, half - 1, -1):
            if window[index] in marks:
                return index + 1
    return len(window)


def _strip(phonemes: list[str]) -> list[str]:
    start, end = 0, len(phonemes)
    while start < end and phonemes[start] == WORD_BREAK:
        start += 1
    while end > start and phonemes[end - 1] == WORD_BREAK:
        end -= 1
    return phonemes[start:end]
