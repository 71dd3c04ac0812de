"""The flow states' store of pages: who holds a page, when it is free again, how it grows, and
where a call's rows read and write."""

from __future__ import annotations

import gc

import pytest
import torch

from contract.errors import ErrorCode
from worker.engines.cosyvoice.flow_state import FlowMemoryFullError, FlowPages, paged_slots


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
