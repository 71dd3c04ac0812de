"""The flow estimator's Euler step alone, and its attention part by part.

Reads the flow's configuration from `--model-dir` (a full-size random-weight CosyVoice2
directory is built if it has none) and makes its estimator with random weights. For each
`--shapes` entry rows:new:earlier it times one estimator call over a history as the streamed
solver makes it (guided and unguided rows: twice `rows`), then, at that shape, the parts of one
attention block: the query projection, the key and value projections (two products, and one
product over the stacked weights, as the block runs them), scaled-dot-product attention under each
backend that takes the block's mask (on keys and values that are views of the stacked product's
halves, and without a mask, as a floor: every key visible), the
output projection, the whole attention, a transformer block and a resnet block. On a GPU each
part is replayed from a CUDA graph (median of CUDA-event timings); on the CPU (a dry run) it is
run eagerly. Also prints the kernels (CPU: operators) of one eager estimator call.

    python benchmarks/gpu_cosyvoice_estimator.py --model-dir /tmp/cv_full
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_cosyvoice_decode import kernels_launched
from testbed.cosyvoice_models import build_model_dir
from worker.engines.cosyvoice.config import check_model_dir
from worker.engines.cosyvoice.flow import additive
from worker.engines.cosyvoice.flow_decoder import Estimator
from worker.engines.cosyvoice.flow_state import StepHistory, incremental_mask, paged_slots

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def shapes_arg(value: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in value.split(","):
        rows, new, past = (int(v) for v in item.split(":"))
        shapes.append((rows, new, past))
    return shapes


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Milliseconds of one `fn()`: replayed from a graph of `reps` calls on a GPU, else wall."""
    if device.type != "cuda":
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            walls.append(1000 * (time.perf_counter() - started))
        return statistics.median(walls)
    side = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def step_inputs(estimator: Estimator, rows: int, new: int, past: int, device: torch.device,
                dtype: torch.dtype) -> tuple[Any, ...]:
    """Arguments of one streamed estimator call: `new` frames after `past` earlier ones."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    b = 2 * rows
    ch = estimator.cfg.channels[0]
    convs = estimator.convolutions
    mel = estimator.cfg.out_channels
    allowed = incremental_mask(torch.full((rows,), past, device=device),
                               torch.full((rows,), new, device=device), past, new,
                               estimator.cfg.static_chunk_size)
    bias = additive(allowed, dtype)
    page = estimator.cfg.static_chunk_size
    per_row = -(-(past + new) // page)
    pages = [tuple(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]
    write, read = paged_slots(pages, [past] * rows, [new] * rows, rows, past, new, page)
    history = StepHistory(
        store=randn(estimator.attention_blocks, 2, (1 + rows * per_row) * page, ch),
        write_slots=write.to(device), read_slots=read.to(device),
        tails=randn(len(convs), 2, rows, max(convs), 2),
        tail_index=torch.arange(2, device=device).view(1, 1, 2).repeat(b, 1, 1),
        tails_out=randn(len(convs), 2, rows, max(convs), 2))
    t = torch.rand(b, generator=gen).to(device, dtype)
    return (randn(b, mel, new), torch.ones(b, 1, new, device=device, dtype=dtype),
            randn(b, mel, new), t, randn(b, mel), randn(b, mel, new), torch.cat([bias, bias]),
            history)


def attention_parts(estimator: Estimator, args: tuple[Any, ...], device: torch.device
                    ) -> dict[str, float]:
    """Milliseconds of each part of the first mid block's attention (and of its blocks)."""
    *_, bias, history = args
    resnet, blocks = cast(Any, estimator.mid_blocks[0])
    block = blocks[0]
    attn = block.attn1
    b, new = bias.size(0), bias.size(1)
    ch = history.store.size(-1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, new, ch, generator=gen).to(device, bias.dtype)
    keys = history.keys(block.index, x)
    # Alternatives to gathering frame by frame: each row's earlier frames as whole pages (the
    # grid's 50 frames, contiguous in the store), then the new frames after them; and a plain
    # copy of as many bytes, as a floor.
    page = estimator.cfg.static_chunk_size
    store = history.store[block.index]
    past = keys.size(1) - new
    first_pages = history.read_slots.view(b // 2, -1)[:, :past:page] // page
    by_page = store.view(2, -1, page * ch)
    floor = torch.empty_like(keys)

    def gather_pages() -> torch.Tensor:
        earlier = by_page.index_select(1, first_pages.flatten()).view(b, past, ch)
        return torch.cat([earlier, x], dim=1)

    kv_weight = torch.cat([attn.to_k.weight, attn.to_v.weight])
    heads = attn.heads

    def split(y: torch.Tensor) -> torch.Tensor:
        return y.view(b, -1, heads, y.size(-1) // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(keys)), split(attn.to_v(keys))
    k_stacked, v_stacked = (split(y) for y in F.linear(keys, kv_weight).chunk(2, dim=-1))
    mask = bias.unsqueeze(1)
    t = args[3]
    temb = estimator.time_mlp(estimator.time_embeddings(t).to(t.dtype))
    time_shift = estimator.time_shifts(temb)[1]  # the first mid block's resnet: the second
    frame_mask = args[1].transpose(1, 2)  # [B, T, 1]: the estimator's blocks are channels last
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(
        b, new, -1)
    parts = {
        "keys from the store": lambda: history.keys(block.index, x),
        "copy of the keys' bytes": lambda: floor.copy_(keys),
        "q projection": lambda: attn.to_q(x),
        "k + v projections": lambda: (attn.to_k(keys), attn.to_v(keys)),
        "k/v stacked projection": lambda: F.linear(keys, kv_weight),
        "sdpa (default)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa no mask": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa stacked k/v views": lambda: F.scaled_dot_product_attention(
            q, k_stacked, v_stacked, attn_mask=mask),
        "output projection": lambda: attn.to_out[0](out),
        "attention": lambda: attn(x, bias, keys),
        "transformer block": lambda: block(x, bias, history),
        "resnet block": lambda: resnet(x, frame_mask, time_shift, history),
    }
    if past % page == 0:  # earlier frames in whole pages, as the engine's states hold them
        parts["keys as whole pages + cat"] = gather_pages
        parts["earlier pages alone"] = lambda: by_page.index_select(1, first_pages.flatten())
    times = {}
    for name, fn in parts.items():
        times[name] = time_ms(fn, device)
    for name, backend in BACKENDS.items():
        def attend(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        try:
            times[f"sdpa {name}"] = time_ms(attend, device)
        except RuntimeError:
            times[f"sdpa {name}"] = float("nan")  # this backend takes no such mask here
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--shapes", type=shapes_arg,
                        default=shapes_arg("1:56:400,16:56:400,64:56:400,64:106:100,64:56:600"),
                        help="rows:new frames:earlier frames, comma-separated")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run on a tiny model")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not (args.model_dir / "flow.pt").exists():
        build_model_dir(args.model_dir, size="full")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    estimator = Estimator(check_model_dir(args.model_dir).flow.estimator).to(device, dtype)
    estimator.eval()
    with torch.inference_mode():
        for rows, new, past in args.shapes:
            inputs = step_inputs(estimator, rows, new, past, device, dtype)
            call_ms = time_ms(lambda inputs=inputs: estimator(*inputs), device)
            kernels = kernels_launched(lambda inputs=inputs: estimator(*inputs), device)
            print(f"rows {rows:3d}, {new:4d} new after {past:4d}: estimator call {call_ms:8.3f} "
                  f"ms ({kernels} kernels)", flush=True)
            for name, ms in attention_parts(estimator, inputs, device).items():
                print(f"    {name:<24} {ms:8.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
