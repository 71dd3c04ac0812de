"""Seedable noise for Piper (VITS) voices.

A Piper ONNX voice draws its noise inside the graph with `RandomNormalLike` nodes (one in the
stochastic duration predictor, one before the flow). ONNX Runtime seeds those kernels once, when
the session is built, and advances them on every run, so the same text gives different audio
(and a different length) on every call and on every worker. Seeding ONNX Runtime globally does
not help: the kernels keep their own generator for the session's lifetime.

`make_noise_seedable` rewrites the graph so that each `RandomNormalLike` reads a new float32
input of shape [1, channels, NOISE_FRAMES] instead: the input is tiled when the tensor it stands
in for is larger, then sliced to that tensor's shape. `NoiseBank.feeds` fills those inputs
from the request's numpy generator, so a request's seed fixes its audio exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

NOISE_FRAMES = 1024
"""Time steps of noise drawn per input; longer tensors reuse it (tiled), shorter ones slice it."""

NOISE_CHANNELS = 192
"""Channels drawn for a noise input whose channel count the graph does not state (VITS voices
use 2 in the duration predictor and 192 before the flow; a larger tensor tiles the noise)."""


@dataclass(frozen=True)
class NoiseInput:
    """A graph input that replaced one `RandomNormalLike` node."""

    name: str
    channels: int


def make_noise_seedable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[NoiseInput, ...]]:
    """Replace every `RandomNormalLike` node of a batch-1 [1, C, T] graph by a noise input.

    Returns the patched model (the argument is modified in place) and the inputs to feed.
    Channel counts come from the graph's declared shapes where it has them (no shape inference:
    it costs a second per voice at start-up), else NOISE_CHANNELS. ONNX Runtime validates the
    result when it builds the session.
    """
    channels_by_name = _static_channels(model)
    graph = model.graph
    inputs: list[NoiseInput] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            new_nodes.append(node)
            continue
        like = node.input[0]
        channels = channels_by_name.get(like, NOISE_CHANNELS)
        index = len(inputs)
        noise = NoiseInput(name=f"noise_{index}", channels=channels)
        inputs.append(noise)
        shape = [1, channels, NOISE_FRAMES]
        graph.input.append(helper.make_tensor_value_info(noise.name, TensorProto.FLOAT, shape))
        prefix = f"/noise{index}"
        new_nodes.extend(_tiled_slice_nodes(noise.name, like, node.output[0], prefix=prefix))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model, tuple(inputs)


class NoiseBank:
    """A fixed block of standard normal noise; a request's generator picks windows of it.

    Drawing 2 x 192 x 1024 normals per sentence costs 5-30 ms on a busy 2-core host, on the
    path to the first audio. The bank is drawn once from `bank_seed` (the same on every worker);
    each input then takes a window at a random time offset and channel rotation, both from the
    request's generator, so the noise is still fixed by the seed, and varied across seeds
    (frames x channels windows). An input wider than the bank reuses its rows.
    """

    def __init__(self, *, channels: int, frames: int = 16 * NOISE_FRAMES, bank_seed: int = 0):
        if frames < NOISE_FRAMES:
            raise ValueError(f"the bank needs at least {NOISE_FRAMES} frames")
        rng = np.random.default_rng(bank_seed)
        bank = rng.standard_normal((channels, frames), dtype=np.float32)
        # Wrapped copies of the first rows and columns make every window a plain slice.
        self._wrapped = np.pad(bank, ((0, channels), (0, NOISE_FRAMES)), mode="wrap")
        self._channels = channels
        self._frames = frames
        self.layout = f"bank{bank_seed}:{channels}x{frames}"

    def feeds(
        self, inputs: tuple[NoiseInput, ...], rng: np.random.Generator
    ) -> dict[str, npt.NDArray[np.float32]]:
        feeds = {}
        for noise in inputs:
            offset = int(rng.integers(self._frames))
            rotation = int(rng.integers(self._channels))
            window = self._wrapped[:, offset : offset + NOISE_FRAMES]
            if noise.channels <= self._channels:
                block = window[rotation : rotation + noise.channels]
            else:
                block = window[(np.arange(noise.channels) + rotation) % self._channels]
            feeds[noise.name] = np.ascontiguousarray(block)[np.newaxis]
        return feeds


def _static_channels(model: onnx.ModelProto) -> dict[str, int]:
    found: dict[str, int] = {}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[1].HasField("dim_value"):
            found[info.name] = dims[1].dim_value
    return found


def _tiled_slice_nodes(noise: str, like: str, output: str, *, prefix: str) -> list[onnx.NodeProto]:
    """out = Slice(Tile(noise, ceil(shape(like) / shape(noise))), 0, shape(like))."""
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}/one")
    zeros = numpy_helper.from_array(np.array([0, 0, 0], dtype=np.int64), f"{prefix}/zeros")
    return [
        helper.make_node("Constant", [], [one.name], value=one),
        helper.make_node("Constant", [], [zeros.name], value=zeros),
        helper.make_node("Shape", [like], [f"{prefix}/shape"]),
        helper.make_node("Shape", [noise], [f"{prefix}/noise_shape"]),
        helper.make_node("Sub", [f"{prefix}/noise_shape", one.name], [f"{prefix}/less_one"]),
        helper.make_node("Add", [f"{prefix}/shape", f"{prefix}/less_one"], [f"{prefix}/padded"]),
        helper.make_node("Div", [f"{prefix}/padded", f"{prefix}/noise_shape"], [f"{prefix}/tiles"]),
        helper.make_node("Tile", [noise, f"{prefix}/tiles"], [f"{prefix}/tiled"]),
        helper.make_node("Slice", [f"{prefix}/tiled", zeros.name, f"{prefix}/shape"], [output]),
    ]
