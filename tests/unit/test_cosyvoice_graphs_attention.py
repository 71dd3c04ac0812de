"""cuDNN's attention: off for eager calls on a GPU, on only while graphs are captured."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from worker.engines.cosyvoice.graphs import attention_without_cudnn, cudnn_attention


@pytest.fixture(autouse=True)
def restore_switch() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_a_cuda_engine_turns_cudnn_attention_off() -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    attention_without_cudnn(torch.device("cuda"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_a_cpu_engine_leaves_the_switch_alone() -> None:
    torch.backends.cuda.enable_cudnn_sdp(True)
    attention_without_cudnn(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_captures_allow_cudnn_attention_and_then_restore_the_switch() -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    with cudnn_attention():
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError), cudnn_attention():
        raise RuntimeError("a capture that fails")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
