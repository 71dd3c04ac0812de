"""Continuous batching of the speech-token LLM: many requests decode in one step.

A request takes a row of the slot pool (`SlotPool`), its prompt is prefilled into the row, and
from then on every `step` advances all occupied rows by one token, each at its own position,
sampled on the device with its own seed. Rows join and leave between steps. The inputs of a step
travel to the device as one small tensor and the new tokens come back as one; in between, on a
GPU, the whole step (embedding, 24 layers, head, sampling) is one CUDA graph replay, captured at
warm-up for each batch-size bucket (1, 2, 4, ... rows) and never while serving. So is the prefill
of one prompt, padded up to one of a few lengths: eagerly it is some 400 kernels launched one by
one, which a request waits for before its first token; a few prompts that arrive together are
prefilled one after the other from these graphs, many at once eagerly in one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn
from transformers import Qwen2Model

from worker.engines.cosyvoice.decode import PoolDecoder, SlotPool
from worker.engines.cosyvoice.graphs import cudnn_attention
from worker.engines.cosyvoice.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

# Columns of the per-step input tensor; the last `win_size` columns are the recent tokens.
_TOKEN, _POSITION, _SEED, _COUNTER, _ALLOW_EOS, _HISTORY = range(6)

PREFILL_LENGTHS = (128, 256, 512)
"""Prompt lengths (text and prompt tokens) that a prompt prefilled alone is padded up to and
replayed at."""

PREFILL_ALONE_ROWS = 8
"""Up to this many prompts that arrive together are prefilled one by one from the graphs (a
replay is ~3 ms on an H200; an eager pass over a few prompts 30-90 ms, bound by its launches)."""


class SpeechModel(Protocol):
    """What decoding needs of a speech-token LLM (CosyVoice2's `SpeechLM`, CosyVoice3's)."""

    backbone: Qwen2Model
    speech_embedding: nn.Embedding
    llm_decoder: nn.Linear

    @property
    def eos(self) -> int: ...

    def logp(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, V] of the next token, end of speech at column `eos`."""
        ...


@dataclass
class Row:
    """The host-side state of one decoding request (its row of the pool is `slot`)."""

    slot: int
    seed: int
    min_len: int
    max_len: int
    position: int = 0
    tokens: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.tokens) >= self.max_len


@dataclass
class _PrefillBucket:
    """Static inputs of one request's prefill padded to `length` positions, and its outputs."""

    length: int
    x: torch.Tensor
    """[1, length, H]: the prompt's embeddings, zero past them."""
    slot: torch.Tensor
    last: torch.Tensor
    """[1]: the position of the prompt's last embedding."""
    inputs: torch.Tensor
    logp: torch.Tensor
    token: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None


def buckets(capacity: int) -> list[int]:
    """Batch sizes that get a graph: powers of two up to `capacity`, and `capacity` itself."""
    sizes = [1]
    while sizes[-1] * 2 < capacity:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != capacity:
        sizes.append(capacity)
    return sizes


class BatchDecoder:
    def __init__(
        self, lm: SpeechModel, sampling: SamplingParams, slots: int, positions: int,
        use_graphs: bool, prefill_lengths: tuple[int, ...] = (),
    ) -> None:
        """`prefill_lengths`: the padded lengths a prompt is prefilled alone at (each at most
        `positions`), replayed from graphs on a GPU (with `use_graphs`) and run padded, eagerly,
        elsewhere; more than `PREFILL_ALONE_ROWS` prompts at once, or any longer than every
        length, are prefilled together as they are."""
        self.lm = lm
        self.sampling = sampling
        self.pool = SlotPool(lm.backbone, slots, positions)
        self.decoder = PoolDecoder(lm.backbone, self.pool)
        self.device = lm.llm_decoder.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.width = _HISTORY + sampling.win_size
        self._inputs = torch.zeros(slots, self.width, dtype=torch.long, device=self.device)
        self._tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            probe = lm.logp(torch.zeros(1, 1, lm.llm_decoder.in_features, device=self.device,
                                        dtype=lm.llm_decoder.weight.dtype))
        self._logp = torch.zeros(slots, probe.size(1), device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        hidden = lm.llm_decoder.in_features
        dtype = lm.llm_decoder.weight.dtype
        self._prefills = [
            _PrefillBucket(
                length=n, x=torch.zeros(1, n, hidden, device=self.device, dtype=dtype),
                slot=torch.zeros(1, dtype=torch.long, device=self.device),
                last=torch.zeros(1, dtype=torch.long, device=self.device),
                inputs=torch.zeros(1, self.width, dtype=torch.long, device=self.device),
                logp=torch.zeros(1, probe.size(1), device=self.device),
                token=torch.zeros(1, dtype=torch.long, device=self.device))
            for n in sorted(prefill_lengths) if n <= positions
        ]

    @property
    def slots(self) -> int:
        return self.pool.slots

    @property
    def positions(self) -> int:
        return self.pool.positions

    @torch.inference_mode()
    def capture(self) -> None:
        """Record a graph of `step` for every bucket, and of each padded prefill (GPU only;
        idempotent). Both replay on the decoding loop only, never at once: one pool."""
        if not self.use_graphs or self._graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

        def record(compute: Callable[[], None]) -> torch.cuda.CUDAGraph:
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    compute()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # A stream of its own, so its own GEMM workspace (see graphs.py).
            with torch.cuda.graph(graph, pool=pool, stream=side,
                                  capture_error_mode="thread_local"):
                compute()
            return graph

        with cudnn_attention():
            self._record_all(record)

    def _record_all(self, record: Callable[[Callable[[], None]], torch.cuda.CUDAGraph]) -> None:
        for size in reversed(buckets(self.slots)):
            self._graphs[size] = record(partial(self._compute, size))
        try:
            for bucket in reversed(self._prefills):
                bucket.graph = record(partial(self._prefill_padded, bucket))
        except RuntimeError:
            logger.warning("Capturing the prefill's graphs failed; prompts are prefilled "
                           "eagerly", exc_info=True)
            self._prefills = []
        # The padded prefills wrote their padding into slot 0, which no request holds yet.
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, row: Row, embeds: torch.Tensor) -> int:
        """Write a prompt [1, L, H] into the row's slot; returns the first token (or eos)."""
        return self.prefill_rows([row], [embeds])[0]

    @torch.inference_mode()
    def prefill_rows(self, rows: list[Row], embeds: list[torch.Tensor]) -> list[int]:
        """`prefill` for several rows in one pass (prompts padded on the right to the longest);
        returns each row's first token."""
        for row, e in zip(rows, embeds, strict=True):
            if e.size(1) + row.max_len > self.positions:
                raise ValueError(
                    f"prompt of {e.size(1)} positions and {row.max_len} speech tokens exceed "
                    f"the cache's {self.positions} positions"
                )
        lengths = [e.size(1) for e in embeds]
        if len(rows) <= PREFILL_ALONE_ROWS:
            fitted = [next((b for b in self._prefills if b.length >= n), None) for n in lengths]
            if all(b is not None for b in fitted):
                return [self._prefill_alone(cast(_PrefillBucket, b), row, e)
                        for b, row, e in zip(fitted, rows, embeds, strict=True)]
        x = embeds[0].new_zeros(len(rows), max(lengths), embeds[0].size(2))
        for i, e in enumerate(embeds):
            x[i, : e.size(1)] = e[0]
        hidden = self.decoder.prefill_rows(x, [r.slot for r in rows])
        last = hidden[torch.arange(len(rows)), torch.tensor(lengths, device=hidden.device) - 1]
        for row, n in zip(rows, lengths, strict=True):
            row.position = n
        inputs = torch.from_numpy(self._host_inputs(rows, len(rows), by_slot=False)).to(
            self.device)
        logp = self.lm.logp(last.unsqueeze(1))
        for i, row in enumerate(rows):
            self._logp[row.slot].copy_(logp[i])
        return [int(t) for t in self._sample(logp, inputs).tolist()]

    def _prefill_alone(self, bucket: _PrefillBucket, row: Row, embeds: torch.Tensor) -> int:
        """One prompt [1, L, H] prefilled padded to the bucket's length (its padding lands past
        the prompt, where decoding overwrites it before any step attends to it)."""
        n = embeds.size(1)
        bucket.x.zero_()
        bucket.x[:, :n].copy_(embeds)
        bucket.slot.fill_(row.slot)
        bucket.last.fill_(n - 1)
        bucket.inputs.copy_(torch.from_numpy(self._host_inputs([row], 1, by_slot=False)))
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._prefill_padded(bucket)
        row.position = n
        self._logp[row.slot].copy_(bucket.logp[0])
        return int(bucket.token.item())

    def _prefill_padded(self, bucket: _PrefillBucket) -> None:
        hidden = self.decoder.prefill_rows(bucket.x, bucket.slot)
        logp = self.lm.logp(hidden.index_select(1, bucket.last))
        bucket.logp.copy_(logp)
        bucket.token.copy_(self._sample(logp, bucket.inputs))

    @torch.inference_mode()
    def step(self, rows: list[Row]) -> list[int]:
        """Feed each row's last token and sample its next one; returns them in `rows` order.

        The rows' own `position` advances; `tokens` is the caller's to extend.
        """
        size = next(b for b in buckets(self.slots) if b > max(r.slot for r in rows))
        self._inputs[:size].copy_(torch.from_numpy(self._host_inputs(rows, size)))
        graph = self._graphs.get(size)
        if graph is not None:
            graph.replay()
        else:
            self._compute(size)
        drawn = self._tokens[:size].cpu().numpy()
        for row in rows:
            row.position += 1
        return [int(drawn[r.slot]) for r in rows]

    def last_logp(self, slot: int) -> torch.Tensor:
        """Log-probabilities [V] the last `prefill` or `step` computed for `slot` (tests)."""
        return self._logp[slot].clone()

    def _host_inputs(self, rows: list[Row], size: int, by_slot: bool = True) -> np.ndarray:
        """The step's inputs, one line per row of the bucket (by slot) or per row given."""
        table = np.zeros((size, self.width), dtype=np.int64)
        table[:, _HISTORY:] = -1
        win = self.sampling.win_size
        for i, r in enumerate(rows):
            line = table[r.slot if by_slot else i]
            line[_TOKEN] = r.tokens[-1] if r.tokens else 0
            line[_POSITION] = r.position
            line[_SEED] = r.seed
            line[_COUNTER] = len(r.tokens)
            line[_ALLOW_EOS] = int(len(r.tokens) >= r.min_len)
            recent = r.tokens[-win:]
            if recent:
                line[self.width - len(recent) :] = recent
        return table

    @torch.inference_mode()
    def _compute(self, size: int) -> None:
        inputs = self._inputs[:size]
        x = self.lm.speech_embedding(inputs[:, _TOKEN]).unsqueeze(1)
        hidden = self.decoder.step(x, inputs[:, _POSITION])
        logp = self.lm.logp(hidden)
        self._logp[:size].copy_(logp)
        self._tokens[:size].copy_(self._sample(logp, inputs))

    def _sample(self, logp: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its log-probabilities and its line of step inputs."""
        return sample(
            logp, inputs[:, _HISTORY:], inputs[:, _SEED], inputs[:, _COUNTER],
            inputs[:, _ALLOW_EOS].bool(), self.sampling, self.lm.eos,
        )
