"""How many streams the engine can hold on its GPU.

Each stream keeps a row of the LLM's KV pool and, while it speaks, its flow state (0.57 MB per
mel frame on the released model: 29 MB per second of audio, prompt included). Both are counted
against the memory left once the weights and the graphs' buffers are in place, with a share of
the device kept for the working tensors of batched calls and the prompt states' cache's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STREAM_BUDGET_S = 15.0
"""Seconds of audio, prompt included, each stream's flow state is budgeted for. Longer pieces
still run; the budget is what the stated capacity is planned on."""

WORKING_SHARE = 0.15
"""Share of the device's memory kept for the working tensors of batched calls."""

PROMPT_CACHE_SHARE = 0.05
"""Most of the device's memory the prompt states' cache (`prompt_cache_mb`) may take."""


SMALL_DEVICE_BYTES = 100 * 2**30
"""Below this much memory a GPU gets half the audio rows by default (`default_audio_rows`)."""


def default_audio_rows(device: torch.device) -> int:
    """Chunks per audio call (`max_audio_rows`) unless set: 64, or 32 on a GPU of less than
    100 GiB. The graphs' pools grow with the rows (CosyVoice2's encoder's alone is 9.2 GiB at
    32 rows on an H100), and on an 80 GB H100 at 64 rows they and the buffers they had then left
    room for few streams."""
    if device.type == "cuda" and \
            torch.cuda.get_device_properties(device).total_memory < SMALL_DEVICE_BYTES:
        return 32
    return 64


def prompt_cache_bytes(requested: int, total_bytes: int) -> int:
    """The prompt states' cache budget on a device of `total_bytes`: as requested, up to
    `PROMPT_CACHE_SHARE` of the device."""
    return min(requested, int(PROMPT_CACHE_SHARE * total_bytes))


@dataclass(frozen=True)
class StreamCost:
    kv_row_bytes: int
    flow_frame_bytes: int
    frames_per_second: int
    frame_quantum: int = 1
    """Frames of flow state allocated at a time (a stream holds a whole number of them)."""

    def bytes(self, seconds: float = STREAM_BUDGET_S) -> int:
        frames = -(-int(seconds * self.frames_per_second) // self.frame_quantum)
        return self.kv_row_bytes + frames * self.frame_quantum * self.flow_frame_bytes


def streams_that_fit(free_bytes: int, total_bytes: int, cost: StreamCost, limit: int) -> int:
    """Streams whose KV rows and budgeted flow states fit in `free_bytes`, leaving the working
    share of `total_bytes`; at least 1 and at most `limit`."""
    usable = free_bytes - WORKING_SHARE * total_bytes
    return max(1, min(limit, int(usable // cost.bytes())))


def flow_frame_bytes(steps: int, attention_blocks: int, channels: int, element_size: int) -> int:
    """Bytes a flow state keeps per mel frame: every step's attention-block inputs, for the
    guided and the unguided row."""
    return steps * attention_blocks * 2 * channels * element_size
