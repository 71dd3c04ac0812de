"""The per-prompt cache of flow states: keyed by the prompt's content, computed once per
distinct prompt, least recently used out first within its byte budget."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engines.cosyvoice.flow_state import FlowPages, FlowState
from worker.engines.cosyvoice.prompt_states import PromptStates, prompt_key

PAGES = FlowPages(steps=1, blocks=1, channels=128, page_frames=1, pages=4,
                  device=torch.device("cpu"), dtype=torch.float32)
"""A store of 1 kB pages of one frame each (it grows as the tests take pages)."""


def _state(frames: int) -> FlowState:
    """A state of `frames` frames of 1 kB each (no tails)."""
    pages = PAGES.take(frames)
    state = PAGES.state(frames, tuple(pages), torch.zeros(0), shared=True)
    PAGES.release(pages)
    return state


def _compute(sizes: dict[str, int], keys: list[str], asked: list[list[str]]
             ) -> Callable[[list[int]], list[FlowState | None]]:
    def compute(positions: list[int]) -> list[FlowState | None]:
        asked.append([keys[p] for p in positions])
        return [_state(sizes[keys[p]]) if sizes[keys[p]] else None for p in positions]
    return compute


def test_each_distinct_prompt_is_computed_once_and_then_kept() -> None:
    cache = PromptStates(max_bytes=10 * 1024)
    sizes = {"a": 2, "b": 3, "short": 0}
    asked: list[list[str]] = []
    keys = ["a", "b", "a", "short"]
    first = cache.get(keys, _compute(sizes, keys, asked))
    assert asked == [["a", "b", "short"]]
    assert [None if s is None else s.frames for s in first] == [2, 3, 2, None]
    assert first[0] is first[2]
    again = cache.get(keys, _compute(sizes, keys, asked))
    assert asked[1:] == [["short"]]  # a prompt with no state is not kept
    assert again[0] is first[0]
    assert again[1] is first[1]
    assert cache.nbytes == 5 * 1024
    assert cache.computed == 4


def test_the_least_recently_used_goes_first_and_nothing_exceeds_the_budget() -> None:
    cache = PromptStates(max_bytes=5 * 1024)
    sizes = {"a": 2, "b": 2, "c": 2, "huge": 6}
    asked: list[list[str]] = []
    for keys in (["a"], ["b"], ["a"], ["c"], ["huge"]):
        cache.get(keys, _compute(sizes, keys, asked))
        assert cache.nbytes <= 5 * 1024
    assert cache.nbytes == 4 * 1024  # "b" went for "c"; "huge" was never kept
    asked.clear()
    for keys in (["a"], ["c"], ["b"]):
        cache.get(keys, _compute(sizes, keys, asked))
    assert asked == [["b"]]


def test_prompt_key_changes_with_every_part_of_the_prompt() -> None:
    tokens = torch.arange(30, dtype=torch.int32)
    mel = torch.randn(60, 80, generator=torch.Generator().manual_seed(0))
    embedding = torch.randn(192, generator=torch.Generator().manual_seed(1))
    key = prompt_key(tokens, mel, embedding)
    assert key == prompt_key(tokens.clone(), mel.clone(), embedding.clone())
    changed_tokens = tokens.clone()
    changed_tokens[5] += 1
    changed_mel = mel.clone()
    changed_mel[10, 3] += 1e-3
    others = {prompt_key(changed_tokens, mel, embedding),
              prompt_key(tokens, changed_mel, embedding),
              prompt_key(tokens, mel, embedding * 2),
              prompt_key(tokens[:29], mel, embedding)}
    assert key not in others
    assert len(others) == 4
