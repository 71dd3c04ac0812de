"""What the flow keeps of an utterance between chunks, so that a chunk computes only its frames.

The estimator is chunk-causal when streaming: a frame sees its own 50-frame chunk and every
earlier one, and its convolutions are causal. Chunks end on that grid (the first chunk is sized
so that prompt + chunk does), so the frames already made never see later ones and their
intermediate values never change. Each Euler step of a new chunk therefore needs, of the earlier
frames, only what its layers read across time: the input of every attention block (its keys and
values are projected again from it) and the last two input frames of every causal convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FRAME_GROWTH = 256
"""A state's frame capacity grows in steps of this many frames."""


@dataclass
class FlowState:
    """One utterance's estimator state over its first `frames` mel frames (prompt included).

    `attention` [steps, blocks, 2, capacity, C] holds the normalised input of every attention
    block at every Euler step, for the guided (0) and unguided (1) pass; `tails` [steps, convs,
    2, C_max, 2] the last two input frames of every causal convolution (channels beyond a
    convolution's own are zero).
    """

    frames: int
    attention: torch.Tensor
    tails: torch.Tensor
    shared: bool = False
    """Read by many utterances (a prompt's state): extending it copies, never writes into it."""

    def extended(self, attention: torch.Tensor, tails: torch.Tensor) -> FlowState:
        """This state followed by `attention` [steps, blocks, 2, n, C] more frames, ending with
        convolution `tails`."""
        n = attention.size(3)
        total = self.frames + n
        store = self.attention
        if total > store.size(3) or self.shared:
            capacity = -(-total // FRAME_GROWTH) * FRAME_GROWTH
            grown = store.new_empty(*store.shape[:3], capacity, store.size(4))
            grown[:, :, :, : self.frames] = store[:, :, :, : self.frames]
            store = grown
        store[:, :, :, self.frames : total] = attention
        return FlowState(total, store, tails.clone())

    @staticmethod
    def start(attention: torch.Tensor, tails: torch.Tensor) -> FlowState:
        empty = attention.new_empty(*attention.shape[:3], 0, attention.size(4))
        return FlowState(0, empty, tails).extended(attention, tails)

    def to_share(self) -> FlowState:
        """A copy of this state, holding its frames only, that utterances extend by copying."""
        return FlowState(self.frames, self.attention[:, :, :, : self.frames].clone(),
                         self.tails.clone(), shared=True)

    @property
    def nbytes(self) -> int:
        return self.attention.nbytes + self.tails.nbytes


@dataclass
class StepHistory:
    """One estimator call's view of the earlier frames of a batch, and where it records the new
    ones. Rows are ordered guided-then-unguided, as the solver stacks them: row g*R + r.

    `context` [blocks, 2, R, H + N, C] holds every attention block's keys' inputs: the earlier
    frames' (read, padded to H) then the new frames' (written by the block before it attends),
    so keys and values are projected from one tensor. `tails` [convs, 2, R, C_max, 2] are read
    and `tails_out` written. `tail_index` [2R, 1, 2] holds, per row, where the two input frames
    before its kept ones end sit in [tail, new frames].
    """

    context: torch.Tensor
    past_width: int
    tails: torch.Tensor
    tail_index: torch.Tensor
    tails_out: torch.Tensor


@dataclass
class SolverHistory:
    """`StepHistory` for every Euler step: the same tensors with a leading step dimension."""

    context: torch.Tensor
    past_width: int
    tails: torch.Tensor
    tail_index: torch.Tensor
    tails_out: torch.Tensor

    @property
    def attention_out(self) -> torch.Tensor:
        """The new frames' records [steps, blocks, 2, R, N, C]."""
        return self.context[:, :, :, :, self.past_width :]

    def step(self, index: int) -> StepHistory:
        return StepHistory(self.context[index], self.past_width, self.tails[index],
                           self.tail_index, self.tails_out[index])

    def load(self, states: list[FlowState | None], kept_frames: torch.Tensor) -> None:
        """Fill the earlier frames from each row's state, and the tail positions: each row's
        tails are recorded where its first `kept_frames` new frames end (the frames its next
        state keeps). What the earlier frames held past a row's own is left: the attention mask
        hides those keys, and every value ever written there is finite."""
        self.tails.zero_()
        for i, state in enumerate(states):
            if state is not None:
                self.context[:, :, :, i, : state.frames] = state.attention[:, :, :, : state.frames]
                self.tails[:, :, :, i] = state.tails
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
