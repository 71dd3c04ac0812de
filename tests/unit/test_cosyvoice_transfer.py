"""Copies from the host to a GPU go through pinned memory without blocking; elsewhere they are
plain copies."""

from __future__ import annotations

from unittest import mock

import torch

from worker.engines.cosyvoice.transfer import to_device


def test_a_copy_to_a_gpu_is_pinned_and_does_not_block() -> None:
    tensor = mock.MagicMock(spec=torch.Tensor)
    gpu = torch.device("cuda", 0)
    placed = to_device(tensor, gpu)
    tensor.pin_memory.assert_called_once_with()
    tensor.pin_memory.return_value.to.assert_called_once_with(gpu, non_blocking=True)
    assert placed is tensor.pin_memory.return_value.to.return_value
    tensor.to.assert_not_called()


def test_a_copy_to_the_cpu_is_a_plain_one() -> None:
    tensor = torch.arange(6).view(2, 3)
    placed = to_device(tensor, torch.device("cpu"))
    assert torch.equal(placed, tensor)
    assert not placed.is_pinned()
