"""StatelessPhonemizer drains what a text leaves in the translator, and fails loudly if it can't."""

from __future__ import annotations

import threading

import pytest

from worker.engines.piper_phonemes import PROBE_TEXT, PhonemizerStateError, StatelessPhonemizer


class LeakyTranslator:
    """Like espeak-ng: text ending in `..` leaves a "dot" that the next call starts with."""

    def __init__(self, *, drains: bool = True) -> None:
        self.pending: list[str] = []
        self.drains = drains
        self.calls = 0
        self.inside = 0
        self.overlapped = False

    def phonemize(self, text: str) -> list[list[str]]:
        self.inside += 1
        self.overlapped |= self.inside > 1
        self.calls += 1
        words = [*self.pending, *text.split()]
        self.pending = ["dot"] if text.endswith("..") or (self.pending and not self.drains) else []
        self.inside -= 1
        return [words] if words else []


def test_a_text_ending_in_two_dots_does_not_reach_the_next_call() -> None:
    translator = LeakyTranslator()
    phonemizer = StatelessPhonemizer(translator)
    assert phonemizer.phonemize("Okay..") == [["Okay.."]]
    assert phonemizer.phonemize("Hello") == [["Hello"]]
    assert translator.pending == []


def test_a_translator_that_stays_dirty_is_a_fatal_error() -> None:
    translator = LeakyTranslator(drains=False)
    phonemizer = StatelessPhonemizer(translator)
    with pytest.raises(PhonemizerStateError):
        phonemizer.phonemize("Okay..")


def test_the_probe_is_taken_from_a_clean_translator() -> None:
    translator = LeakyTranslator()
    StatelessPhonemizer(translator)
    assert translator.phonemize(PROBE_TEXT) == [PROBE_TEXT.split()]


def test_calls_from_many_threads_never_overlap() -> None:
    translator = LeakyTranslator()
    phonemizer = StatelessPhonemizer(translator)
    results: list[list[list[str]]] = []

    def run(text: str) -> None:
        for _ in range(200):
            results.append(phonemizer.phonemize(text))

    threads = [threading.Thread(target=run, args=(text,)) for text in ("Okay..", "Hello")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not translator.overlapped
    assert len(results) == 400
    assert all(result in ([["Hello"]], [["Okay.."]]) for result in results)
