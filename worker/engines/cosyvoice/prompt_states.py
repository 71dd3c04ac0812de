"""The flow's state over a prompt, kept per prompt so that first chunks start from it.

A request's first chunk otherwise solves every frame of its prompt (150 of the 200 frames of a
first chunk after a 3 s voice). What the estimator computes over the prompt's leading chunks
depends on the prompt alone (`FlowModel.prompt_states`), so requests with the same voice share
it: it is computed once, on the first request that needs it, and kept here, least recently used
first out, within a byte budget on the device. Workers hold no voice: this is a cache keyed by
the prompt's own content, and a prompt it lacks is computed again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import torch


class PromptState(Protocol):
    @property
    def nbytes(self) -> int: ...


S = TypeVar("S", bound=PromptState)


def prompt_key(prompt_tokens: torch.Tensor, prompt_mel: torch.Tensor,
               embedding: torch.Tensor) -> str:
    """A digest of everything the flow reads of a prompt."""
    digest = hashlib.md5(usedforsecurity=False)
    for tensor in (prompt_tokens, prompt_mel, embedding):
        data = tensor.detach().cpu().contiguous()
        digest.update(str((tuple(data.shape), data.dtype)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class PromptStates(Generic[S]):
    """Prompt states by `prompt_key`, within `max_bytes` (0 keeps none): CosyVoice2's
    `FlowState`, CosyVoice3's `PromptPrefix`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._states: OrderedDict[str, S] = OrderedDict()
        self._bytes = 0
        self.computed = 0
        """Prompts computed so far (tests and benchmarks)."""

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, keys: list[str],
            compute: Callable[[list[int]], list[S | None]]) -> list[S | None]:
        """The state of each key; those not kept are computed together by `compute` (given
        their positions in `keys`, one per distinct key) and kept if they fit (a prompt with no
        state, too short to hold one, is cheap to ask again and is not kept)."""
        missing: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._states and key not in missing:
                missing[key] = i
        made = dict(zip(missing, compute(list(missing.values())), strict=True)) if missing else {}
        self.computed += len(made)
        found = [made[key] if key in made else self._touch(key) for key in keys]
        for key, state in made.items():
            if state is not None:
                self._keep(key, state)
        return found

    def _touch(self, key: str) -> S:
        self._states.move_to_end(key)
        return self._states[key]

    def _keep(self, key: str, state: S) -> None:
        if state.nbytes > self.max_bytes:
            return
        while self._states and self._bytes + state.nbytes > self.max_bytes:
            _, old = self._states.popitem(last=False)
            self._bytes -= old.nbytes
        self._states[key] = state
        self._bytes += state.nbytes
