"""Continuous batching of the speech-token LLM: many requests decode in one step.

A request takes a row of the slot pool (`SlotPool`), its prompt is prefilled into the row, and
from then on every `step` advances all occupied rows by one token, each at its own position,
sampled on the device with its own seed. Rows join and leave between steps. The inputs of a step
travel to the device as one small tensor and the new tokens come back as one; in between, on a
GPU, the whole step (embedding, 24 layers, head, sampling) is one CUDA graph replay, captured at
warm-up for each batch-size bucket (1, 2, 4, ... rows) and never while serving. So is the prefill
of a group of prompts, padded up to one of a few lengths and row counts: eagerly it is some 400
kernels launched one by one, which a request waits for before its first token; prompts that
arrive together are prefilled in groups of one padded length from these graphs, and only a
prompt longer than every length eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

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
"""Prompt lengths (text and prompt tokens) that prompts prefilled from graphs are padded up to."""

PREFILL_ROWS = (1, 4, 16)
"""Prompts prefilled in one replay: a group of prompts of one padded length takes the graph of
the fewest rows that holds it (16 at a time beyond). A replay of one prompt is ~3 ms on an H200;
an eager pass over 19 prompts took 40-70 ms, bound by its launches."""


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
    """Static inputs of the prefill of `rows` prompts padded to `length` positions, and its
    outputs. A group of fewer prompts fills the rows past it with its last prompt again (same
    embeddings, slot and inputs): they write what that prompt writes, where it writes it."""

    rows: int
    length: int
    x: torch.Tensor
    """[rows, length, H]: the prompts' embeddings, zero past them."""
    slot: torch.Tensor
    last: torch.Tensor
    """[rows]: the position of each prompt's last embedding."""
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
        prefill_rows: tuple[int, ...] = PREFILL_ROWS,
    ) -> None:
        """`prefill_lengths` and `prefill_rows`: the padded lengths (each at most `positions`)
        and row counts that groups of prompts are prefilled at, replayed from graphs on a GPU
        (with `use_graphs`) and run padded, eagerly, elsewhere; prompts that arrive with one
        longer than every length are prefilled together as they are."""
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
                rows=r, length=n, x=torch.zeros(r, n, hidden, device=self.device, dtype=dtype),
                slot=torch.zeros(r, dtype=torch.long, device=self.device),
                last=torch.zeros(r, dtype=torch.long, device=self.device),
                inputs=torch.zeros(r, self.width, dtype=torch.long, device=self.device),
                logp=torch.zeros(r, probe.size(1), device=self.device),
                token=torch.zeros(r, dtype=torch.long, device=self.device))
            for n in sorted(prefill_lengths) if n <= positions for r in sorted(prefill_rows)
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
            for bucket in sorted(self._prefills, key=lambda b: -b.rows * b.length):
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
        padded = [next((b.length for b in self._prefills if b.length >= n), 0) for n in lengths]
        if self._prefills and 0 not in padded:
            tokens = [0] * len(rows)
            for length in sorted(set(padded)):
                waiting = [i for i, p in enumerate(padded) if p == length]
                while waiting:
                    bucket = self._bucket(length, len(waiting))
                    group, waiting = waiting[: bucket.rows], waiting[bucket.rows :]
                    drawn = self._prefill_group(bucket, [rows[i] for i in group],
                                                [embeds[i] for i in group])
                    for i, token in zip(group, drawn, strict=True):
                        tokens[i] = token
            return tokens
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

    def _bucket(self, length: int, count: int) -> _PrefillBucket:
        """The bucket of `length` with the fewest rows that holds `count` prompts, else the
        most rows."""
        fitting = [b for b in self._prefills if b.length == length]
        return next((b for b in fitting if b.rows >= count), fitting[-1])

    def _prefill_group(self, bucket: _PrefillBucket, rows: list[Row],
                       embeds: list[torch.Tensor]) -> list[int]:
        """Prompts [1, L, H] (at most the bucket's rows) prefilled padded to the bucket's length
        (their padding lands past each prompt, where decoding overwrites it before any step
        attends to it); the bucket's rows past them repeat the last."""
        padded_rows = rows + [rows[-1]] * (bucket.rows - len(rows))
        padded_embeds = embeds + [embeds[-1]] * (bucket.rows - len(rows))
        bucket.x.zero_()
        for i, e in enumerate(padded_embeds):
            bucket.x[i, : e.size(1)].copy_(e[0])
        bucket.slot.copy_(torch.tensor([r.slot for r in padded_rows]))
        bucket.last.copy_(torch.tensor([e.size(1) - 1 for e in padded_embeds]))
        bucket.inputs.copy_(torch.from_numpy(
            self._host_inputs(padded_rows, bucket.rows, by_slot=False)))
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            self._prefill_padded(bucket)
        for i, (row, e) in enumerate(zip(rows, embeds, strict=True)):
            row.position = e.size(1)
            self._logp[row.slot].copy_(bucket.logp[i])
        return [int(t) for t in bucket.token[: len(rows)].tolist()]

    def _prefill_padded(self, bucket: _PrefillBucket) -> None:
        hidden = self.decoder.prefill_rows(bucket.x, bucket.slot)
        last = bucket.last.view(-1, 1, 1).expand(-1, 1, hidden.size(2))
        logp = self.lm.logp(hidden.gather(1, last))
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
