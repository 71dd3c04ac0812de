"""Text normalisation and sentence splitting for Chinese and English input.

Numbers are spelled out (English words, or Chinese numerals for Chinese text), symbols the model
never saw are rewritten or dropped, and long text is cut at sentence ends into pieces the LLM
handles comfortably (each piece is synthesized and streamed in order).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ((10**8, "亿"), (10**4, "万"), (1000, "千"), (100, "百"), (10, "十"))
_CJK = re.compile(r"[\u4e00-\u9fff]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def english_number(n: int) -> str:
    """Cardinal in English words, e.g. 1234 -> 'one thousand two hundred thirty four'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, rest = divmod(n, 10)
        return _TENS[tens] + ("" if rest == 0 else " " + _ONES[rest])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            words = f"{english_number(head)} {name}"
            return words if rest == 0 else f"{words} {english_number(rest)}"
    raise AssertionError("unreachable")


def chinese_number(n: int) -> str:
    """Cardinal in Chinese numerals, e.g. 2024 -> '二千零二十四'."""
    if n < 10:
        return _ZH_DIGITS[n]
    for value, name in _ZH_UNITS:
        if n >= value:
            head, rest = divmod(n, value)
            prefix = "" if (value == 10 and head == 1) else chinese_number(head)
            words = prefix + name
            if rest == 0:
                return words
            gap = "零" if rest < value // 10 else ""
            return words + gap + chinese_number(rest)
    raise AssertionError("unreachable")


def _spell(match: re.Match[str], chinese: bool) -> str:
    whole, _, frac = match.group(0).partition(".")
    if len(whole) > 12:
        digits = _ZH_DIGITS if chinese else _ONES
        sep = "" if chinese else " "
        return sep.join(digits[int(d)] for d in match.group(0) if d.isdigit())
    spoken = chinese_number(int(whole)) if chinese else english_number(int(whole))
    if frac:
        if chinese:
            spoken += "点" + "".join(_ZH_DIGITS[int(d)] for d in frac)
        else:
            spoken += " point " + " ".join(_ONES[int(d)] for d in frac)
    return f" {spoken} " if not chinese else spoken


def normalize(text: str) -> str:
    """Spell numbers, unify punctuation and whitespace; the language is guessed per text."""
    chinese = is_chinese(text)
    text = text.replace("\n", " " if not chinese else "。").replace("\t", " ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = _NUMBER.sub(lambda m: _spell(m, chinese), text)
    if chinese:
        text = text.replace(" ", "")
        text = re.sub(r"[—–]", "，", text)  # noqa: RUF001
        text = re.sub(r"[()（）\[\]【】《》\"“”]", "", text)  # noqa: RUF001
    else:
        text = text.replace("&", " and ").replace("%", " percent")
        text = re.sub(r"[\[\]<>{}|^~`]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])\s*")  # noqa: RUF001


def split_sentences(
    text: str, count_tokens: Callable[[str], int], max_tokens: int = 80, min_tokens: int = 60,
) -> list[str]:
    """Pieces of at most about `max_tokens` tokens, cut at sentence ends, merged up to `min_tokens`.

    A sentence longer than `max_tokens` is cut at commas, then at spaces, as a last resort.
    """
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    pieces: list[str] = []
    for sentence in sentences:
        pieces.extend(_cut_long(sentence, count_tokens, max_tokens))
    merged: list[str] = []
    for piece in pieces:
        joiner = "" if is_chinese(piece) else " "
        if merged and count_tokens(merged[-1]) < min_tokens and (
            count_tokens(merged[-1]) + count_tokens(piece) <= max_tokens
        ):
            merged[-1] = merged[-1] + joiner + piece
        else:
            merged.append(piece)
    return [m.strip() for m in merged if m.strip()]


def _cut_long(sentence: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    if count_tokens(sentence) <= max_tokens:
        return [sentence]
    for separator in (r"(?<=[,，、:：])", r"(?<=\s)"):  # noqa: RUF001
        parts = [p for p in re.split(separator, sentence) if p.strip()]
        if len(parts) > 1:
            out: list[str] = []
            current = ""
            for part in parts:
                if current and count_tokens(current + part) > max_tokens:
                    out.append(current)
                    current = part
                else:
                    current += part
            if current:
                out.append(current)
            return [p for chunk in out for p in _cut_long(chunk, count_tokens, max_tokens)]
    step = max(1, len(sentence) // max(2, count_tokens(sentence) // max_tokens + 1))
    return [sentence[i : i + step] for i in range(0, len(sentence), step)]
