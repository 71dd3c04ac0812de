"""Copies from the host that do not make it wait for the device."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`. To a GPU it goes through pinned memory without
    blocking: a plain copy from pageable memory waits until the stream's earlier work is done,
    which leaves the GPU idle while the host prepares what follows."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
