"""Capture and replay of the static-shape buckets that the flow, encoder and vocoder keep.

A bucket owns static input buffers, and after capture the graph and the output tensors it wrote;
`run(bucket)` computes from the buffers. Capture happens once, at warm-up: each bucket is run
once on a side stream (so lazy initialisation and library plans happen outside the graph), then
recorded on that same stream, all buckets of one stage sharing a memory pool (they never replay at
once). Each stage captures on a stream of its own because cuBLAS keys its GEMM workspace by the
stream a call is made on, and a graph keeps the workspace it was captured with: graphs captured on
one stream (torch's default capture stream) and replayed at once on two (the decoding loop's and
the audio loop's) would write the same workspace at the same time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import torch


class Bucket(Protocol):
    graph: torch.cuda.CUDAGraph | None
    output: Any


B = TypeVar("B", bound=Bucket)


def attention_without_cudnn(device: torch.device) -> None:
    """Keep scaled-dot-product attention off cuDNN for every call made outside a capture.

    cuDNN's attention builds an execution plan for each new input shape, and the eager calls
    (batched prefills, flow calls past the graphs' buckets) meet a new shape at almost every
    call: one H200 spent ~1 s in CosyVoice3's first 16-row prefill and 0.5-0.7 s in every
    48-row flow call. Graphs replay fixed shapes, so captures keep it (`cudnn_attention`)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


@contextlib.contextmanager
def cudnn_attention() -> Iterator[None]:
    """cuDNN's attention allowed for a capture (at warm-up, before any loop runs: the switch
    is global)."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()  # type: ignore[no-untyped-call]
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def capture_all(buckets: Iterable[B], run: Callable[[B], Any], device: torch.device,
                warm: Callable[[B], Any] | None = None) -> None:
    """Capture `run` for every bucket, each first run eagerly once (or `warm`: a cheaper call
    of the same shapes, such as one step of a loop that repeats them)."""
    with cudnn_attention():
        _capture_all(buckets, run, device, warm or run)


def _capture_all(buckets: Iterable[B], run: Callable[[B], Any], device: torch.device,
                 warm: Callable[[B], Any]) -> None:
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
    for bucket in buckets:
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm(bucket)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            bucket.output = run(bucket)
        bucket.graph = graph
    torch.cuda.synchronize(device)
    # What the eager runs left cached belongs to the side stream, where no later call allocates.
    torch.cuda.empty_cache()


def usable(bucket: B | None, on_cuda: bool) -> B | None:
    """The bucket if it can serve a call: captured, or never captured on the CPU (where it runs
    eagerly, which is how the CPU tests exercise the padding)."""
    if bucket is None or (bucket.graph is None and on_cuda):
        return None
    return bucket


def replay(bucket: B, run: Callable[[B], Any]) -> Any:
    """The bucket's output for what its buffers hold now: its graph replayed, or (never
    captured: on the CPU) computed eagerly."""
    if bucket.graph is None:
        return run(bucket)
    bucket.graph.replay()
    return bucket.output
