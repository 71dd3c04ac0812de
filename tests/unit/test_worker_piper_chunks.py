from __future__ import annotations

import pytest

from worker.engines.piper_chunks import split_phonemes


def letters(text: str) -> list[str]:
    return list(text)


def test_short_sentences_stay_whole() -> None:
    assert split_phonemes(letters(" hello, world "), 50) == [letters("hello, world")]


def test_cuts_after_a_clause_mark_in_the_second_half() -> None:
    phonemes = letters("aaaa bbbb, cccc dddd eeee")
    assert split_phonemes(phonemes, 14) == [letters("aaaa bbbb,"), letters("cccc dddd eeee")]


def test_falls_back_to_words_then_to_the_limit() -> None:
    assert split_phonemes(letters("aaa bbb ccc ddd"), 8) == [
        letters("aaa bbb"),
        letters("ccc ddd"),
    ]
    assert split_phonemes(letters("x" * 10), 4) == [letters("xxxx"), letters("xxxx"), ["x", "x"]]


def test_every_piece_is_within_the_limit_and_nothing_is_lost() -> None:
    phonemes = letters("one, two three; four five six: seven eight nine ten " * 20)
    pieces = split_phonemes(phonemes, 37)
    assert all(0 < len(piece) <= 37 for piece in pieces)
    assert "".join(phonemes).replace(" ", "") == "".join("".join(p) for p in pieces).replace(
        " ", ""
    )


def test_blank_input_gives_nothing() -> None:
    assert split_phonemes([" ", " "], 10) == []
    with pytest.raises(ValueError, match="limit"):
        split_phonemes(["a"], 1)
