"""The graph patch that makes Piper's noise come from the request seed, on a tiny graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from worker.engines.piper_noise import NOISE_FRAMES, NoiseBank, make_noise_seedable


def noisy_model(channels: int | None) -> onnx.ModelProto:
    """y = x + RandomNormalLike(x), with x of shape [1, C, T]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels or "C", "T"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels or "C", "T"])
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["noise"], dtype=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "noise"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "noisy", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def run(channels: int | None, frames: int, seed: int) -> np.ndarray:
    model, inputs = make_noise_seedable(noisy_model(channels))
    x = np.zeros((1, 3, frames), dtype=np.float32)
    feeds = {"x": x, **NoiseBank(channels=8).feeds(inputs, np.random.default_rng(seed))}
    return np.asarray(session(model).run(None, feeds)[0])


def test_unpatched_graph_is_not_repeatable() -> None:
    s = session(noisy_model(3))
    x = np.zeros((1, 3, 50), dtype=np.float32)
    assert not np.array_equal(s.run(None, {"x": x})[0], s.run(None, {"x": x})[0])


@pytest.mark.parametrize("channels", [3, None])
def test_same_seed_same_noise(channels: int | None) -> None:
    first = run(channels, 50, seed=7)
    assert first.shape == (1, 3, 50)
    np.testing.assert_array_equal(first, run(channels, 50, seed=7))
    assert not np.array_equal(first, run(channels, 50, seed=8))
    assert 0.5 < float(first.std()) < 1.5


def test_longer_than_the_noise_buffer_tiles() -> None:
    frames = NOISE_FRAMES * 2 + 10
    out = run(3, frames, seed=1)
    assert out.shape == (1, 3, frames)
    first, second = out[..., :NOISE_FRAMES], out[..., NOISE_FRAMES : 2 * NOISE_FRAMES]
    np.testing.assert_array_equal(first, second)


def test_patch_declares_one_input_per_random_node() -> None:
    model, inputs = make_noise_seedable(noisy_model(3))
    assert [noise.name for noise in inputs] == ["noise_0"]
    assert inputs[0].channels == 3
    assert not [node for node in model.graph.node if node.op_type == "RandomNormalLike"]


def test_bank_windows_are_fixed_by_the_seed_and_vary_across_seeds() -> None:
    _, inputs = make_noise_seedable(noisy_model(3))
    bank = NoiseBank(channels=192)
    first = bank.feeds(inputs, np.random.default_rng(5))["noise_0"]
    assert first.shape == (1, 3, NOISE_FRAMES)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, bank.feeds(inputs, np.random.default_rng(5))["noise_0"])
    again = NoiseBank(channels=192).feeds(inputs, np.random.default_rng(5))["noise_0"]
    np.testing.assert_array_equal(first, again)
    other = bank.feeds(inputs, np.random.default_rng(6))["noise_0"]
    assert not np.array_equal(first, other)
    assert abs(float(first.mean())) < 0.1
    assert 0.9 < float(first.std()) < 1.1


def test_inputs_wider_than_the_bank_reuse_rows() -> None:
    _, inputs = make_noise_seedable(noisy_model(5))
    block = NoiseBank(channels=2).feeds(inputs, np.random.default_rng(1))["noise_0"][0]
    assert block.shape == (5, NOISE_FRAMES)
    np.testing.assert_array_equal(block[0], block[2])
