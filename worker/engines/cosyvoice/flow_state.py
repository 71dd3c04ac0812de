"""What the flow keeps of an utterance between chunks, so that a chunk computes only its frames.

The estimator is chunk-causal when streaming: a frame sees its own 50-frame chunk and every
earlier one, and its convolutions are causal. Chunks end on that grid (the first chunk is sized
so that prompt + chunk does), so the frames already made never see later ones and their
intermediate values never change. Each Euler step of a new chunk therefore needs, of the earlier
frames, only what its layers read across time: the input of every attention block (its keys and
values are projected again from it) and the last two input frames of every causal convolution.

The attention blocks' inputs live in one store of pages (`FlowPages`), one page per chunk of the
grid, which the estimator reads and writes in place: a call gathers each row's earlier frames
from its pages and records its new frames in pages of its own, so no call copies a history in or
out, and a prompt's pages are held once by every stream that starts from them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from contract.errors import ErrorCode, ServiceError
from worker.engines.cosyvoice.transfer import to_device


class FlowMemoryFullError(ServiceError):
    """The flow states' store has no free page for a stream's next frames: that stream ends
    with 503 `busy` (the others go on)."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.BUSY, "The speech engine's memory for streams is full; "
                                         "retry later.")


class FlowPages:
    """Every utterance's attention-block inputs, in pages of `page_frames` mel frames.

    `store` [steps, blocks, 2, pages, page_frames, C] holds, for every Euler step and attention
    block, the normalised input of each frame, for the guided (0) and unguided (1) pass
    (CosyVoice3's flow keeps its layers' keys and values here instead, as blocks of one step,
    each Euler step in pages of its own: `v3_flow`). Page 0
    is scratch: padding frames are written there, and whatever is read from it is masked. A page
    is held by every state that covers it (a prompt's state and each stream started from it) and
    is free again once the last of them is dropped. Graphs replay reads and writes of the store
    itself, so once `fixed` it never moves, and a stream that finds no free page fails
    (`FlowMemoryFullError`); until then (on the CPU, or with no graphs) a full store grows.
    """

    def __init__(self, steps: int, blocks: int, channels: int, page_frames: int, pages: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if page_frames <= 0:
            raise ValueError("a streamed flow needs its estimator's chunk grid (static_chunk_size)")
        self.steps = steps
        self.page_frames = page_frames
        self.store = torch.zeros(steps, blocks, 2, max(2, pages), page_frames, channels,
                                 device=device, dtype=dtype)
        self.fixed = False
        self._holders = [0] * self.pages
        self._free = list(range(self.pages - 1, 0, -1))
        self._lock = threading.Lock()

    @property
    def pages(self) -> int:
        return self.store.size(3)

    @property
    def page_bytes(self) -> int:
        return self.store[:, :, :, 0].numel() * self.store.element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def flat(self) -> torch.Tensor:
        """The store as [steps, blocks, 2, pages * page_frames, C]: frame f of page p is slot
        p * page_frames + f."""
        return self.store.flatten(3, 4)

    def take(self, count: int) -> list[int]:
        """`count` free pages, held once by the caller (`release` them)."""
        with self._lock:
            if count > len(self._free):
                if self.fixed:
                    raise FlowMemoryFullError()
                self._grow(count - len(self._free))
            taken = [self._free.pop() for _ in range(count)]
            for page in taken:
                self._holders[page] = 1
            return taken

    def hold(self, pages: tuple[int, ...] | list[int]) -> None:
        with self._lock:
            for page in pages:
                self._holders[page] += 1

    def release(self, pages: tuple[int, ...] | list[int]) -> None:
        with self._lock:
            for page in pages:
                self._holders[page] -= 1
                if self._holders[page] == 0:
                    self._free.append(page)

    def _grow(self, needed: int) -> None:
        old = self.pages
        grown = torch.zeros(*self.store.shape[:3], max(2 * old, old + needed),
                            *self.store.shape[4:], device=self.store.device,
                            dtype=self.store.dtype)
        grown[:, :, :, :old] = self.store
        self.store = grown
        self._holders += [0] * (self.pages - old)
        self._free = list(range(self.pages - 1, old - 1, -1)) + self._free

    def state(self, frames: int, pages: tuple[int, ...], tails: torch.Tensor,
              shared: bool = False) -> FlowState:
        """A state over the first `frames` frames of `pages` (held while it lives)."""
        self.hold(pages)
        return FlowState(frames, _Held(self, pages), tails, shared)

    def read(self, state: FlowState) -> torch.Tensor:
        """A copy of what `state` holds: [steps, blocks, 2, frames, C]."""
        index = torch.tensor(state.pages, device=self.store.device, dtype=torch.long)
        return self.store.index_select(3, index).flatten(3, 4)[:, :, :, : state.frames]


class _Held:
    """Pages held for one state, let go when the state is dropped."""

    __slots__ = ("owner", "pages")

    def __init__(self, owner: FlowPages, pages: tuple[int, ...]) -> None:
        self.owner = owner
        self.pages = pages

    def __del__(self) -> None:
        self.owner.release(self.pages)


class FlowState:
    """One utterance's estimator state over its first `frames` mel frames (prompt included):
    the attention blocks' inputs in its pages of the store (`FlowPages`), and `tails` [steps,
    convs, 2, C_max, 2] the last two input frames of every causal convolution (channels beyond a
    convolution's own are zero). Made by `FlowPages.state`."""

    def __init__(self, frames: int, held: _Held, tails: torch.Tensor, shared: bool) -> None:
        self.frames = frames
        self._held = held
        self.tails = tails
        self.shared = shared
        """Read by many utterances (a prompt's state): its pages are never written."""

    @property
    def pages(self) -> tuple[int, ...]:
        return self._held.pages

    def to_share(self) -> FlowState:
        """The same frames, as a state that many utterances start from."""
        return self._held.owner.state(self.frames, self.pages, self.tails.clone(), shared=True)

    @property
    def nbytes(self) -> int:
        return len(self.pages) * self._held.owner.page_bytes + self.tails.nbytes


def paged_slots(pages: list[tuple[int, ...]], past: list[int], new: list[int], rows: int,
                width_past: int, width_new: int, page_frames: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a call's rows read and write the store's frames (slots of `FlowPages.flat`), for
    `rows` rows (those past `len(pages)` pad) of `width_new` new frames after `width_past`
    earlier ones: the new frames' slots [rows * width_new] (frame `past[r] + j` of row r), and
    the keys' slots [rows * (width_past + width_new)] (each row's earlier frames, then its new
    ones). Padding reads and writes scratch slots of page 0 (a row of no pages, no earlier and no
    new frames is padding too). Computed on `device` (the store's), from one small copy of the
    rows' pages and counts: a slot per frame is too many for the host to make and send."""
    count = len(pages)
    most = max(1, max((len(p) for p in pages), default=0))
    rows_in = torch.zeros(rows, most + 2, dtype=torch.long)  # pages, then past and new
    if count:
        rows_in[:count] = torch.tensor(
            [(*p, *(0,) * (most - len(p)), b, n) for p, b, n in zip(pages, past, new,
                                                                    strict=True)],
            dtype=torch.long)
    rows_in = to_device(rows_in, device or rows_in.device)
    table, starts, counts = rows_in[:, :most], rows_in[:, most:most + 1], rows_in[:, most + 1:]

    def slots(position: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        page = table.gather(1, torch.div(position, page_frames, rounding_mode="floor").clamp(
            max=most - 1))
        found = page * page_frames + position % page_frames
        return torch.where(real, found, position % page_frames)

    j = torch.arange(width_new, device=rows_in.device).unsqueeze(0)
    write = slots(starts + j, j < counts)
    k = torch.arange(width_past, device=rows_in.device).unsqueeze(0)
    earlier = slots(k.expand(rows, -1), k < starts)
    return write.flatten(), torch.cat([earlier, write], dim=1).flatten()


@dataclass(frozen=True)
class CallPages:
    """The pages of a solver call's rows in `store`: row r's earlier frames (`past[r]`, on the
    grid) and its `new[r]` new ones, which the call records there."""

    store: FlowPages
    rows: list[tuple[int, ...]]
    past: list[int]
    new: list[int]

    def slots(self, rows: int, width_past: int, width_new: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`paged_slots` for these rows, padded to `rows` x (`width_past`, `width_new`)."""
        return paged_slots(self.rows, self.past, self.new, rows, width_past, width_new,
                           self.store.page_frames, self.store.store.device)


WORDS = (torch.complex128, torch.int64)
"""16- and 8-byte elements that a frame's channels are copied as, bit for bit."""


def as_words(*frames: torch.Tensor) -> list[torch.Tensor]:
    """Each of `frames` [..., C] (one dtype) viewed as the widest of `WORDS` all their layouts
    allow along C, for copies by index between them: a bf16 frame of 256 channels is then 32
    elements, not 256, and `index_select` moves it at the bandwidth of a plain copy (0.026
    against 0.058 ms for 64 rows x 506 frames on an H100)."""
    def allows(t: torch.Tensor, width: int) -> bool:
        size = t.element_size()
        return t.stride(-1) == 1 and all(
            (n * size) % width == 0 for n in (t.size(-1), t.storage_offset(), *t.stride()[:-1]))

    for word in WORDS:
        if all(allows(t, word.itemsize) for t in frames):
            return [t.view(word) for t in frames]
    return list(frames)


@dataclass
class StepHistory:
    """One estimator call's view of the earlier frames of a batch, and where it records the new
    ones. Rows are ordered guided-then-unguided, as the solver stacks them: row g*R + r.

    `store` [blocks, 2, slots, C] is this step's part of the flat store (`FlowPages.flat`); each
    attention block writes its new frames' inputs at `write_slots` [R * N] and reads its keys'
    inputs from `read_slots` [R * K] (`paged_slots`), so keys and values are projected from one
    tensor. `tails` [convs, 2, R, C_max, 2] are read and `tails_out` written. `tail_index`
    [2R, 1, 2] holds, per row, where the two input frames before its kept ones end sit in [tail,
    new frames].
    """

    store: torch.Tensor
    write_slots: torch.Tensor
    read_slots: torch.Tensor
    tails: torch.Tensor
    tail_index: torch.Tensor
    tails_out: torch.Tensor

    def keys(self, block: int, h: torch.Tensor) -> torch.Tensor:
        """Record `h` [2R, N, C], attention block `block`'s input over the new frames, and
        return its keys' inputs [2R, K, C]: each row's earlier frames (padded), then its new
        ones."""
        channels = h.size(-1)
        frames = record_and_gather(self.store[block], self.write_slots, self.read_slots,
                                   h.view(2, -1, channels))
        return frames.view(h.size(0), -1, channels)


def record_and_gather(store: torch.Tensor, write_slots: torch.Tensor, read_slots: torch.Tensor,
                      new: torch.Tensor) -> torch.Tensor:
    """Write `new` [..., R * N, C] into `store` [..., slots, C] (the same leading dimensions)
    at `write_slots` [R * N], and return the frames at `read_slots` [R * K]: [..., R * K, C],
    each row's earlier frames, then its new ones. `new` may be a strided view (its channels
    contiguous): it is copied as it lies."""
    words, new_words = as_words(store, new)
    words.index_copy_(-2, write_slots, new_words)
    return words.index_select(-2, read_slots).view(new.dtype)


@dataclass
class PagedFrames:
    """Where one estimator step records and reads a batch's keys and values in a store of pages
    (see `record_and_gather`): `store` [blocks, 2, slots, C], each layer's keys in block
    2 * layer and its values in 2 * layer + 1, and the slots of `paged_slots`."""

    store: torch.Tensor
    write_slots: torch.Tensor
    read_slots: torch.Tensor

    def keys_values(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        """Record `new` [2 (keys, values), 2 (guided, unguided), R * N, C], a layer's keys and
        values of the new frames, and return the layer's [2, 2, R * K, C] (both in one copy
        each way: the two blocks are adjacent)."""
        return record_and_gather(self.store[2 * layer: 2 * layer + 2], self.write_slots,
                                 self.read_slots, new)


@dataclass
class SolverHistory:
    """`StepHistory` for every Euler step: the store with its leading step dimension and the
    tails' tensors with theirs."""

    store: torch.Tensor
    write_slots: torch.Tensor
    read_slots: torch.Tensor
    tails: torch.Tensor
    tail_index: torch.Tensor
    tails_out: torch.Tensor

    def step(self, index: int) -> StepHistory:
        return StepHistory(self.store[index], self.write_slots, self.read_slots,
                           self.tails[index], self.tail_index, self.tails_out[index])

    def load(self, states: list[FlowState | None], kept_frames: torch.Tensor,
             slots: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Fill in each row's tails and slots (`paged_slots`), and the tail positions: each
        row's tails are recorded where its first `kept_frames` new frames end (the frames its
        next state keeps)."""
        self.tails.zero_()
        held = [(i, state) for i, state in enumerate(states) if state is not None]
        if held:
            rows_held = to_device(torch.tensor([i for i, _ in held]), self.tails.device)
            self.tails.index_copy_(3, rows_held, torch.stack([s.tails for _, s in held], dim=3))
        self.write_slots.copy_(slots[0])
        self.read_slots.copy_(slots[1])
        rows = self.tail_index.size(0) // 2
        counts = torch.zeros(rows, dtype=torch.long, device=kept_frames.device)
        counts[: kept_frames.numel()] = kept_frames
        index = torch.cat([counts, counts]).view(-1, 1, 1)
        self.tail_index.copy_(index + torch.arange(2, device=index.device).view(1, 1, 2))


def incremental_mask(past: torch.Tensor, new: torch.Tensor, width_past: int, width_new: int,
                     chunk: int) -> torch.Tensor:
    """[R, N, H + N] attention mask of new frames over [earlier frames, new frames].

    Row r has `past[r]` earlier frames (padded to `width_past`) and `new[r]` new ones (padded to
    `width_new`); a new frame sees every earlier frame and the new frames of its own and earlier
    chunks, counted from the utterance's start. Padding queries see every valid key, so softmax
    stays finite; their output is masked away.
    """
    device = past.device
    q = torch.arange(width_new, device=device).view(1, -1, 1)
    k = torch.arange(width_new, device=device).view(1, 1, -1)
    start = past.view(-1, 1, 1)
    new_valid = k < new.view(-1, 1, 1)
    if chunk > 0:
        visible = torch.div(start + k, chunk, rounding_mode="floor") <= torch.div(
            start + q, chunk, rounding_mode="floor")
    else:
        visible = torch.ones_like(new_valid)
    past_valid = (torch.arange(width_past, device=device).view(1, 1, -1) < start).expand(
        -1, width_new, -1)
    query_valid = q < new.view(-1, 1, 1)
    allowed_new = new_valid & (visible | ~query_valid)
    return torch.cat([past_valid, allowed_new], dim=2)
