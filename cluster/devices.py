"""Which device each local worker runs on: one worker per GPU, or several sharing one.

`CLUSTER_WORKER_DEVICES` lists devices (`cuda:0,cuda:1`), or says `auto`: one `cuda:<i>` per
GPU this process can see (PyTorch's count, so CUDA_VISIBLE_DEVICES applies). Worker i gets
device i modulo the list's length, as its WORKER_DEVICE: with as many workers as devices each
worker has a GPU of its own; with more, the GPUs are shared in turn, and the launcher says so.
`CLUSTER_WORKERS=auto` (`make up WORKERS=auto`) starts one worker per listed device. Empty
(the default) leaves WORKER_DEVICE as the environment has it, the same for every worker.

docker-compose.yml follows the same rule: its profile gpusN runs N workers, the i-th reserving
GPU i (tests/unit/test_worker_devices.py checks that they agree).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

AUTO = "auto"
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def visible_gpus() -> int:
    """How many CUDA devices PyTorch sees (0 without a GPU or a CUDA build)."""
    import torch

    return int(torch.cuda.device_count())


def parse_devices(spec: str, gpu_count: int | None = None) -> list[str]:
    """The device list a `CLUSTER_WORKER_DEVICES` value names; `auto` counts the GPUs."""
    spec = spec.strip()
    if not spec:
        return []
    if spec.lower() == AUTO:
        count = visible_gpus() if gpu_count is None else gpu_count
        if count == 0:
            raise ValueError(
                "CLUSTER_WORKER_DEVICES=auto, but no GPU is visible "
                "(list devices instead, e.g. cpu, or leave it empty)"
            )
        return [f"cuda:{index}" for index in range(count)]
    devices = [item.strip() for item in spec.split(",")]
    bad = [device for device in devices if not DEVICE_PATTERN.match(device)]
    if bad:
        raise ValueError(f"not devices: {', '.join(map(repr, bad))} (e.g. cuda:0,cuda:1 or auto)")
    return devices


def assign(workers: int, devices: Sequence[str]) -> list[str | None]:
    """Worker index -> WORKER_DEVICE; None for every worker when no device is listed."""
    if not devices:
        return [None] * workers
    return [devices[index % len(devices)] for index in range(workers)]


def describe(assignment: Sequence[str | None], devices: Sequence[str]) -> list[str]:
    """Lines for the launcher to print: GPUs that several workers share, devices left idle."""
    holders: dict[str, list[str]] = {}
    for index, device in enumerate(assignment):
        if device is not None:
            holders.setdefault(device, []).append(f"worker-{index}")
    lines = [
        f"{device} is shared by {len(names)} workers: {', '.join(names)}"
        for device, names in holders.items()
        if len(names) > 1 and device != "cpu"
    ]
    idle = [device for device in dict.fromkeys(devices) if device not in holders]
    if idle:
        lines.append(f"no worker runs on {', '.join(idle)}")
    return lines
