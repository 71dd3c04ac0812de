"""Weights the flows run in another layout (stacked for one product, frame by frame) follow the
released parameters they are made from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from worker.engines.cosyvoice.config import EstimatorConfig
from worker.engines.cosyvoice.derived import Derived
from worker.engines.cosyvoice.flow_decoder import Estimator
from worker.engines.cosyvoice.v3_config import DiTConfig
from worker.engines.cosyvoice.v3_dit import POS_KERNEL, DiT, StepCache

MEL = 8
ROWS, FRAMES = 3, 10


def test_a_derived_tensor_is_made_once_and_again_when_a_source_changes() -> None:
    made = []

    def make(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        made.append(1)
        return torch.cat([a, b])

    derived = Derived(make)
    a, b = torch.ones(2), torch.zeros(3)
    first = derived(a, b)
    assert derived(a, b) is first
    assert len(made) == 1
    a.add_(1)  # in place, as a checkpoint is loaded
    assert torch.equal(derived(a, b), torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))
    assert derived(a.double(), b.double()).dtype == torch.float64  # another tensor and dtype
    assert len(made) == 3


def _estimator(seed: int) -> Estimator:
    torch.manual_seed(seed)
    cfg = EstimatorConfig(in_channels=4 * MEL, out_channels=MEL, channels=(16,),
                          attention_head_dim=8, n_blocks=1, num_mid_blocks=2, num_heads=2,
                          static_chunk_size=4)
    return Estimator(cfg).eval()


def _estimator_call(estimator: Estimator) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return estimator(randn(ROWS, MEL, FRAMES), torch.ones(ROWS, 1, FRAMES),
                     randn(ROWS, MEL, FRAMES), torch.rand(ROWS, generator=gen),
                     randn(ROWS, MEL), randn(ROWS, MEL, FRAMES),
                     torch.zeros(ROWS, FRAMES, FRAMES))


def _dit(seed: int) -> DiT:
    torch.manual_seed(seed)
    cfg = DiTConfig(dim=16, depth=2, heads=2, dim_head=8, ff_mult=2, mel_dim=MEL, mu_dim=MEL,
                    spk_dim=MEL, out_channels=MEL, static_chunk_size=4,
                    num_decoding_left_chunks=-1)
    return DiT(cfg).eval()


def _dit_call(dit: DiT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    tails = [torch.zeros(ROWS, 16, POS_KERNEL - 1)] * 2
    cache = StepCache(torch.zeros(ROWS, dtype=torch.long), None, tails)
    return dit(randn(ROWS, FRAMES, MEL), randn(ROWS, FRAMES, MEL), randn(ROWS, FRAMES, MEL),
               randn(ROWS, MEL), torch.rand(ROWS, generator=gen),
               torch.full((ROWS,), FRAMES), cache, True)


@pytest.mark.parametrize(("build", "call"), [(_estimator, _estimator_call), (_dit, _dit_call)],
                         ids=["cosyvoice2", "cosyvoice3"])
def test_a_flows_estimator_follows_weights_loaded_in_place(
    build: Callable[[int], nn.Module], call: Callable[[Any], torch.Tensor],
) -> None:
    """Run once (its stacked and reshaped weights made), then loaded in place with another
    model's weights, the estimator gives exactly that model's output."""
    model, other = build(0), build(1)
    with torch.inference_mode():
        before = call(model)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after, want = call(model), call(other)
    assert not torch.equal(before, want)
    assert torch.equal(after, want)
