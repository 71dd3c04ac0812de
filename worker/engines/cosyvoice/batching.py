"""One batched call over the rows of many requests, where a bad row must fail alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def each_fails_alone(call: Callable[[list[T]], Sequence[R]], items: list[T]
                     ) -> list[R | Exception]:
    """`call(items)`; if that raises, `call([item])` for each item, giving its result or the
    exception it alone raised (a single item is not tried twice). The call must leave an item's
    state as it was when it raises, so the retry starts from the same place."""
    try:
        return list(call(items))
    except Exception as e:
        if len(items) == 1:
            return [e]
    results: list[R | Exception] = []
    for item in items:
        try:
            results.extend(call([item]))
        except Exception as e:
            results.append(e)
    return results
