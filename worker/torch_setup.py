"""GPU habits for torch engines, applied once per process when a CUDA engine loads.

TF32 matmuls and convolutions are set here, once. cuDNN autotuning (`cudnn.benchmark`) stays
off: a batching engine meets a new input shape at almost every call (batch size and lengths
change with the traffic), and autotuning each one cost the cosyvoice engine a 2-4x slowdown
through the worker on an H200.
Nothing in the request path calls `torch.cuda.empty_cache()` or `gc.collect()`: the caching
allocator keeps freed blocks for the next request on purpose, and a full collection per request
costs tens of milliseconds of CPU for nothing (docs/worker.md has the figures).
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


def is_cuda_device(device: str | None) -> bool:
    return device is not None and device.startswith("cuda")


@functools.cache
def configure_torch_for_cuda() -> None:
    """Enable TF32; idempotent, and a no-op without CUDA."""
    import torch

    if not torch.cuda.is_available():
        logger.warning("A CUDA device was requested but torch sees no CUDA; nothing set")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("high")
    logger.info("torch: TF32 enabled")
