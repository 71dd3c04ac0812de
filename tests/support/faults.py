"""Calls made to fail the way a batch too large for the GPU's memory would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def out_of_memory_when_batched(
    original: Callable[..., Any], rows: Callable[..., int], failed: list[int],
    after_running: bool = False,
) -> Callable[..., Any]:
    """`original`, raising `torch.OutOfMemoryError` whenever `rows(*args)` counts more than one
    row (each such count recorded in `failed`): before it runs, or, with `after_running`, once
    it has run and changed what it changes."""

    def call(*args: Any) -> Any:
        batched = rows(*args)
        if batched > 1 and not after_running:
            failed.append(batched)
            raise torch.OutOfMemoryError("too many rows")
        result = original(*args)
        if batched > 1:
            failed.append(batched)
            raise torch.OutOfMemoryError("too many rows")
        return result

    return call
