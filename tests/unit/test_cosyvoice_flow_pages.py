"""The flow states' store of pages: who holds a page, when it is free again, how it grows, and
where a call's rows read and write."""

from __future__ import annotations

import gc

import pytest
import torch

from contract.errors import ErrorCode
from worker.engines.cosyvoice.flow_decoder import CausalConv1d
from worker.engines.cosyvoice.flow_state import (
    FlowMemoryFullError,
    FlowPages,
    PagedFrames,
    StepHistory,
    as_words,
    paged_slots,
)


def _store(pages: int = 4) -> FlowPages:
    return FlowPages(steps=2, blocks=3, channels=4, page_frames=5, pages=pages,
                     device=torch.device("cpu"), dtype=torch.float32)


def test_a_page_is_free_once_every_state_holding_it_is_gone() -> None:
    store = _store(6)
    assert store.free_pages == 5  # page 0 is scratch
    taken = store.take(2)
    assert 0 not in taken
    state = store.state(10, tuple(taken), torch.zeros(1))
    shared = state.to_share()
    store.release(taken)
    assert store.free_pages == 3
    del state
    gc.collect()
    assert store.free_pages == 3  # the shared copy still holds both
    assert shared.pages == tuple(taken)
    assert shared.nbytes == 2 * store.page_bytes + 4
    del shared
    gc.collect()
    assert store.free_pages == 5


def test_a_full_store_grows_keeping_its_pages_until_fixed() -> None:
    store = _store(3)
    first = store.take(2)
    store.store[:, :, :, first[0]] = 7.0
    more = store.take(3)
    assert store.pages >= 6
    assert len(set(first + more)) == 5
    assert (store.store[:, :, :, first[0]] == 7).all()
    store.fixed = True
    pages = store.pages
    with pytest.raises(FlowMemoryFullError) as full:
        store.take(store.free_pages + 1)
    assert full.value.code == ErrorCode.BUSY
    assert store.pages == pages
    store.release(more[:1])
    assert store.take(1) == more[:1]


def test_read_returns_a_states_frames_in_order() -> None:
    store = _store(5)
    pages = store.take(2)
    flat = store.flat()
    for i, page in enumerate(pages):
        for f in range(5):
            flat[:, :, :, page * 5 + f] = 10 * i + f
    state = store.state(7, tuple(pages), torch.zeros(1))
    got = store.read(state)
    assert got.shape == (2, 3, 2, 7, 4)
    assert got[0, 0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 10, 11]


def test_slots_map_each_rows_frames_to_its_pages_and_padding_to_scratch() -> None:
    # Row 0: 5 earlier frames in page 3, 4 new ones in page 7; row 1: none earlier, 2 new in
    # page 2; a third row pads.
    write, read = paged_slots([(3, 7), (2,)], [5, 0], [4, 2], rows=3, width_past=10,
                              width_new=6, page_frames=5)
    write = write.view(3, 6)
    read = read.view(3, 16)
    assert write[0, :4].tolist() == [35, 36, 37, 38]
    assert (write[0, 4:] < 5).all()  # padding: scratch slots of page 0
    assert write[1, :2].tolist() == [10, 11]
    assert (write[1, 2:] < 5).all()
    assert (write[2] < 5).all()
    assert read[0, :5].tolist() == [15, 16, 17, 18, 19]
    assert (read[0, 5:10] < 5).all()  # padded earlier frames read scratch
    assert read[0, 10:].tolist() == write[0].tolist()
    assert (read[1, :10] < 5).all()
    assert (read[2] < 5).all()


def test_frames_are_gathered_and_written_as_wide_words_bit_for_bit() -> None:
    """`as_words` views a frame's channels as 16- or 8-byte words where the layout allows (and
    leaves the tensor as it is elsewhere); a step's keys read through it are the frames written,
    bit for bit."""
    frames = torch.randn(2, 12, 256).to(torch.bfloat16)
    assert as_words(frames)[0].dtype == torch.complex128
    assert as_words(frames[:, :, :12])[0].dtype == torch.int64  # 24 bytes a frame
    assert as_words(frames[:, :, :3])[0].dtype == torch.bfloat16  # 6 bytes a frame
    # Tensors copied between take the widest word that every one of them allows.
    assert [w.dtype for w in as_words(frames, frames[:, :, 4:])] == [torch.int64] * 2
    store = torch.zeros(1, 2, 10, 8, dtype=torch.bfloat16)  # one block, guided/unguided, slots
    history = StepHistory(store, write_slots=torch.tensor([7, 2]),
                          read_slots=torch.tensor([2, 7, 2]), tails=torch.zeros(0),
                          tail_index=torch.zeros(0), tails_out=torch.zeros(0))
    h = torch.randn(2, 2, 8).to(torch.bfloat16)  # guided row, unguided row; two new frames
    keys = history.keys(0, h)
    assert torch.equal(store[0, :, [7, 2]], h)
    assert torch.equal(keys, h[:, [1, 0, 1]])


def test_a_layers_keys_and_values_are_recorded_and_read_together_from_a_strided_view() -> None:
    """CosyVoice3's layer keeps its keys in block 2 * layer and its values in the next one:
    both are written from the strided view of the layer's projection (as it lies, no copy
    first) and read back in one gather, each row's earlier frames then its new ones."""
    store = torch.zeros(4, 2, 10, 8, dtype=torch.bfloat16)  # 2 layers x (keys, values)
    earlier = torch.randn(2, 2, 10, 8).to(torch.bfloat16)
    store[2:] = earlier
    frames = PagedFrames(store, write_slots=torch.tensor([7, 2]),
                         read_slots=torch.tensor([5, 7, 2]))
    qkv = torch.randn(2, 2, 3, 8).to(torch.bfloat16)  # guided row, unguided row; 2 new frames
    new = qkv[:, :, 1:].view(2, 2, 2, 8).permute(2, 0, 1, 3)  # keys / values, rows, frames
    assert not new.is_contiguous()
    read = frames.keys_values(1, new)
    assert torch.equal(store[2:, :, [7, 2]], new)
    assert torch.equal(store[:2], torch.zeros_like(store[:2]))  # layer 0 untouched
    assert torch.equal(read[:, :, 0], earlier[:, :, 5])
    assert torch.equal(read[:, :, 1:], new)


def test_a_causal_convolution_channels_last_is_the_padded_convolution() -> None:
    """`CausalConv1d` over [B, T, C] equals `conv1d` over the channels-first input padded by
    two zero frames, or by the history's tail, whose two frames before each row's kept ones it
    records; its frame-by-frame weight follows a change of the weight."""
    gen = torch.Generator().manual_seed(3)
    conv = CausalConv1d(6, 5, 3)
    x = torch.randn(4, 9, 6, generator=gen)  # 2 rows, guided then unguided
    reference = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x.transpose(1, 2), (2, 0)), conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), reference.transpose(1, 2))
    tails = torch.randn(1, 2, 2, 7, 2, generator=gen)  # [convs, 2, rows, C_max, 2 frames]
    tail_index = torch.tensor([3, 5, 3, 5]).view(4, 1, 1) + torch.arange(2).view(1, 1, 2)
    tails_out = torch.zeros_like(tails)
    history = StepHistory(torch.zeros(0), torch.zeros(0), torch.zeros(0), tails, tail_index,
                          tails_out)
    tail = tails[0, :, :, :6].reshape(4, 6, 2)
    padded = torch.cat([tail, x.transpose(1, 2)], dim=2)
    reference = torch.nn.functional.conv1d(padded, conv.weight, conv.bias)
    torch.testing.assert_close(conv(x, history), reference.transpose(1, 2))
    recorded = torch.stack([padded[r, :, i : i + 2] for r, i in enumerate((3, 5, 3, 5))])
    torch.testing.assert_close(tails_out[0, :, :, :6], recorded.view(2, 2, 6, 2))
    assert not tails_out[0, :, :, 6:].any()
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(2)
    torch.testing.assert_close(conv(x), 2 * before - conv.bias)
