"""Weights laid out again for the way a model runs them (stacked, reshaped), kept beside the
released parameters, which keep their names and shapes for loading and saving."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Derived:
    """A tensor made by `make` from parameters, made again only when one of them changes:
    another tensor, device or dtype (`Module.to`), or an update in place (a checkpoint loaded
    into it; an inference tensor keeps no count of those, and counts as changed only when
    replaced). The parameters are passed at each call, so nothing here holds their module."""

    def __init__(self, make: Callable[..., torch.Tensor]) -> None:
        self._make = make
        self._made: tuple[tuple[object, ...], torch.Tensor] | None = None

    def __call__(self, *sources: torch.Tensor) -> torch.Tensor:
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.device, t.dtype)
                    for t in sources)
        if self._made is None or self._made[0] != key:
            with torch.no_grad():
                self._made = (key, self._make(*(t.detach() for t in sources)))
        return self._made[1]


def stacked() -> Derived:
    """Tensors stacked along their first dimension: the weights (or biases) of projections of
    one input, for one matrix product in place of one per projection."""
    return Derived(lambda *parts: torch.cat(parts))
