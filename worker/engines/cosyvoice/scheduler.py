"""The engine's one scheduler: every live request's work, batched stage by stage on one device.

Two loops run in their own threads, each on its own CUDA stream so their work overlaps:
- the decoding loop admits waiting requests into free rows of the LLM's slot pool (prefilling
  their prompts, within a token budget per iteration so a burst of long prompts does not stall
  the running streams), then advances every decoding row by one token in one batched step;
- the audio loop takes the next ready chunk of every request (most urgent first: the request
  whose listener will run out of audio soonest), runs the flow over all of them in one call and
  the vocoder per group of equal lengths, and hands each request its audio. A call waits a
  few decode steps for first chunks about to be ready, so requests that arrive together get
  their first audio from one call.

A request is a `Job` (its utterances, and an asyncio queue its `stream()` reads). Cancelling a job
removes it from both loops at their next iteration and frees its row. A failure that belongs to
one job (its prompt, its chunk) fails that job alone; the others carry on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch

from contract.errors import ErrorCode, ServiceError
from worker.engines.cosyvoice.batch_decode import BatchDecoder, Row
from worker.engines.cosyvoice.batching import each_fails_alone
from worker.engines.cosyvoice.pipeline import Chunk, Utterance

logger = logging.getLogger(__name__)

GATHER_TIMEOUT_S = 0.25
"""The longest an audio call waits for first chunks about to be ready (decode steps stalled)."""
DONE = object()
"""Put on a job's queue after its last audio chunk."""


@dataclass(frozen=True)
class DecodeLimits:
    min_ratio: float = 2.0
    max_ratio: float = 20.0
    fixed_tokens: int | None = None

    def bounds(self, utt: Utterance) -> tuple[int, int]:
        if self.fixed_tokens is not None:
            return self.fixed_tokens, self.fixed_tokens
        return int(utt.tts_token_count * self.min_ratio), int(utt.tts_token_count * self.max_ratio)


class AudioStages(Protocol):
    """What the scheduler needs of a model's audio side (CosyVoice2's `AudioStage`,
    CosyVoice3's `V3AudioStage`): whether an utterance has a chunk ready, the audio of many
    chunks at once (or the exception each alone raised), and when an utterance is all spoken."""

    sample_rate: int

    def next_chunk(self, utt: Utterance) -> Chunk | None: ...

    def tokens_due(self, utt: Utterance) -> int:
        """Speech tokens the utterance still needs for its next chunk (0 once decoded)."""
        ...

    def run(self, chunks: list[Chunk]) -> list[np.ndarray | Exception]: ...

    def finished(self, utt: Utterance) -> bool: ...


@dataclass(eq=False)
class Job:
    utterances: list[Utterance]
    loop: asyncio.AbstractEventLoop
    deadline: float | None
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    decoding: int = 0
    """Index of the utterance the LLM works on (== len(utterances) when decoding is over)."""
    speaking: int = 0
    """Index of the utterance the audio stage works on."""
    row: Row | None = None
    admitted: bool = False
    """Given a row once; it holds its audio stage's state until it is all spoken."""
    audio_s: float = 0.0
    first_audio_at: float | None = None
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    """The submitter's context variables (the request id among them), for this job's log lines
    written from the scheduler's threads."""

    @property
    def live(self) -> bool:
        """Neither finished nor cancelled."""
        return not (self.cancelled or self.finished)

    def urgency(self) -> float:
        """When the listener runs out of audio (smaller is more urgent)."""
        if self.first_audio_at is None:
            return self.submitted
        return self.first_audio_at + self.audio_s

    def send(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the request's loop is gone: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.send(error)

    def log(self, level: int, message: str, *args: object,
            error: BaseException | None = None) -> None:
        self.context.run(logger.log, level, message, *args, exc_info=error)


class Scheduler:
    def __init__(
        self,
        decoder: BatchDecoder,
        audio: AudioStages,
        embed: Callable[[Utterance], torch.Tensor],
        limits: DecodeLimits,
        max_audio_rows: int = 64,
        prefill_budget: int = 2048,
        decode_priority: bool = False,
        gather_steps: int = 0,
    ) -> None:
        self.decoder = decoder
        self.audio = audio
        self.embed = embed
        self.limits = limits
        self.max_audio_rows = max_audio_rows
        self.prefill_budget = prefill_budget
        self.decode_priority = decode_priority
        self.gather_steps = gather_steps
        """Decode steps an audio call may wait for first chunks due within as many tokens."""
        self.eos = decoder.lm.eos
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._decoding: list[Job] = []
        self._speaking: list[Job] = []
        self._free_slots = list(range(decoder.slots))
        self._rows = decoder.slots
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.steps = 0
        """Batched decode steps run so far (tests and metrics)."""

    @property
    def capacity(self) -> int:
        """Requests served at once, decoding or still speaking: the decoder's rows, or fewer
        (`limit_rows`)."""
        return self._rows

    def limit_rows(self, rows: int) -> None:
        """Admit requests into the first `rows` rows only (at least one)."""
        with self._lock:
            self._rows = max(1, min(rows, self._rows))
            self._free_slots = [slot for slot in self._free_slots if slot < self._rows]

    @property
    def active(self) -> int:
        """Requests submitted and neither finished nor cancelled."""
        with self._lock:
            return sum(1 for job in self._speaking if job.live)

    def start(self) -> None:
        if self._threads:
            return
        # Stopped before the interpreter tears down torch, which aborts under a live thread.
        atexit.register(self.stop)
        for target, name in ((self._decode_loop, "cosyvoice-decode"),
                             (self._audio_loop, "cosyvoice-audio")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        atexit.unregister(self.stop)  # and let a stopped scheduler, and its GPU memory, go

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is live and every row is free; False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not any(j.live for j in self._speaking) and not self._decoding,
                timeout,
            )

    def submit(self, utterances: list[Utterance], deadline: float | None) -> Job:
        """Queue a request; its audio arrives on `job.queue`, then `DONE` (or an exception)."""
        job = Job(utterances, asyncio.get_running_loop(), deadline)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine has stopped")
            self._waiting.append(job)
            self._speaking.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Forget the job; both loops drop it at their next iteration."""
        with self._lock:
            job.cancelled = True
            self._lock.notify_all()

    # -- decoding ---------------------------------------------------------------------------

    def _decode_loop(self) -> None:
        normal, high = self._new_stream(), self._new_stream(high_priority=True)
        while True:
            with self._lock:
                while not (self._stopping or self._decoding
                           or (self._waiting and self._room() > 0)):
                    self._lock.wait()
                if self._stopping:
                    return
                self._evict()
                admitted = self._admit()
            # Read at every iteration; the previous one's tokens came back to the host, so
            # its work is done whichever stream the next runs on.
            with self._on(high if self.decode_priority else normal):
                if admitted:
                    self._start_utterances(admitted)
                rows = [job for job in self._decoding if job.row is not None]
                if rows:
                    self._step(rows)
            with self._lock:
                self._lock.notify_all()

    def _evict(self) -> None:
        """Drop cancelled jobs, and waiting jobs past their deadline (under the lock)."""
        now = time.monotonic()
        for job in list(self._waiting):
            if job.cancelled:
                self._waiting.remove(job)
            elif job.deadline is not None and now > job.deadline:
                self._waiting.remove(job)
                job.fail(ServiceError(ErrorCode.DEADLINE_EXCEEDED,
                                      "The request waited past its deadline."))
        for job in [j for j in self._decoding if not j.live]:
            self._release(job)

    def _room(self) -> int:
        """Jobs that may be admitted now (under the lock): free rows, and no more than the
        capacity in flight, counting the jobs whose rows are free but whose audio is not all
        spoken (their audio stage's state is as large as a new job's will be)."""
        in_flight = sum(1 for job in self._speaking if job.admitted and job.live)
        return min(len(self._free_slots), self._rows - in_flight)

    def _admit(self) -> list[Job]:
        """Move waiting jobs into free rows, within the room and the prefill budget (under the
        lock)."""
        admitted: list[Job] = []
        budget = self.prefill_budget
        room = self._room()
        while self._waiting and room > 0 and (budget > 0 or not admitted):
            room -= 1
            job = self._waiting.popleft()
            job.admitted = True
            utt = job.utterances[0]
            budget -= len(utt.text_ids) + utt.llm_prompt_tokens.size(1) + 2
            job.row = Row(slot=self._free_slots.pop(0), seed=0, min_len=0, max_len=0)
            self._decoding.append(job)
            admitted.append(job)
        return admitted

    def _release(self, job: Job) -> None:
        if job in self._decoding:
            self._decoding.remove(job)
        if job.row is not None:
            if job.row.slot < self._rows:
                self._free_slots.append(job.row.slot)
                self._free_slots.sort()
            job.row = None

    def _start_utterances(self, jobs: list[Job]) -> None:
        """Prefill each job's current utterance into its row, all in one pass, and take their
        first tokens. A job whose prompt cannot be prefilled fails alone (`each_fails_alone`)."""
        ready = [(job, embeds) for job in jobs if (embeds := self._prepare(job)) is not None]
        if not ready:
            return
        def prefill(pairs: list[tuple[Job, torch.Tensor]]) -> list[int]:
            rows = [job.row for job, _ in pairs]
            assert all(row is not None for row in rows)
            return self.decoder.prefill_rows(cast(list[Row], rows), [e for _, e in pairs])

        tokens = each_fails_alone(prefill, ready)
        for (job, _), token in zip(ready, tokens, strict=True):
            if isinstance(token, Exception):
                job.log(logging.WARNING, "Prefill failed", error=token)
                with self._lock:
                    self._release(job)
                job.fail(token)
            else:
                self._accept(job, token)

    def _prepare(self, job: Job) -> torch.Tensor | None:
        """The job's next utterance's row and prompt embeddings; None (job failed) if its text
        and prompt do not fit."""
        assert job.row is not None
        utt = job.utterances[job.decoding]
        min_len, max_len = self.limits.bounds(utt)
        job.row = Row(slot=job.row.slot, seed=utt.seed, min_len=min_len, max_len=max_len,
                      tokens=utt.tokens)
        try:
            embeds = self.embed(utt)
            max_len = min(max_len, self.decoder.positions - embeds.size(1))
            if max_len < max(min_len, 1):
                raise ServiceError(ErrorCode.TEXT_TOO_LONG,
                                   "The text and prompt are too long for this engine.")
        except Exception as e:
            job.log(logging.WARNING, "Prefill failed", error=e)
            with self._lock:
                self._release(job)
            job.fail(e)
            return None
        job.row.max_len = max_len
        return embeds

    def _step(self, jobs: list[Job]) -> None:
        rows = [job.row for job in jobs if job.row is not None]
        try:
            tokens = self.decoder.step(rows)
        except Exception as e:
            for i, job in enumerate(jobs):
                job.log(logging.ERROR, "A batched decode step of %d requests failed", len(jobs),
                        error=e if i == 0 else None)
            with self._lock:
                for job in jobs:
                    self._release(job)
                    job.fail(e)
            return
        self.steps += 1
        for job, token in zip(jobs, tokens, strict=True):
            self._accept(job, token)

    def _accept(self, job: Job, token: int) -> None:
        """Record a sampled token; end the utterance on eos or at its length cap."""
        row = job.row
        assert row is not None
        utt = job.utterances[job.decoding]
        if token != self.eos:
            utt.tokens.append(token)  # the row's tokens: the audio loop reads them as they come
        if token == self.eos or row.finished:
            utt.decoded = True
            job.decoding += 1
            if job.decoding == len(job.utterances):
                with self._lock:
                    self._release(job)
            else:
                self._start_utterances([job])

    # -- audio ------------------------------------------------------------------------------

    def _audio_loop(self) -> None:
        with self._on(self._new_stream()):
            while True:
                with self._lock:
                    while True:
                        if self._stopping:
                            return
                        self._speaking = [j for j in self._speaking if j.live]
                        ready = self._ready_chunks()
                        if ready:
                            break
                        self._lock.wait()
                    ready = self._gather_first_chunks(ready)
                self._speak(ready)

    def _gather_first_chunks(self, ready: list[tuple[Job, Chunk]]) -> list[tuple[Job, Chunk]]:
        """`ready`, joined by the first chunks due within the next `gather_steps` decode steps
        (under the lock). Requests admitted together reach their first chunk a step or a few
        apart (prefill waves, arrival); without waiting, those a step late would wait out a
        whole audio call for the next. A call never waits while a listener it serves has less
        than `GATHER_TIMEOUT_S` of audio left to play."""
        start = self.steps
        waited_until = time.monotonic() + GATHER_TIMEOUT_S
        if any(job.first_audio_at is not None and job.urgency() < waited_until
               for job, _ in ready):
            return ready

        def due() -> bool:
            left = self.gather_steps - (self.steps - start)
            taken = {id(job) for job, _ in ready}
            return any(
                job.live and job.first_audio_at is None and id(job) not in taken
                and job.row is not None and job.speaking == job.decoding
                and 0 < self.audio.tokens_due(job.utterances[job.speaking]) <= left
                for job in self._speaking)

        while (len(ready) < self.max_audio_rows and not self._stopping and due()
               and time.monotonic() < waited_until):
            self._lock.wait(GATHER_TIMEOUT_S)
            ready = self._ready_chunks()
        return ready

    def _ready_chunks(self) -> list[tuple[Job, Chunk]]:
        ready = []
        for job in sorted(self._speaking, key=Job.urgency):
            chunk = self._next_chunk(job)
            if chunk is not None:
                ready.append((job, chunk))
            if len(ready) == self.max_audio_rows:
                break
        return ready

    def _next_chunk(self, job: Job) -> Chunk | None:
        while job.speaking < len(job.utterances):
            utt = job.utterances[job.speaking]
            chunk = self.audio.next_chunk(utt)
            if chunk is not None:
                return chunk
            if not self.audio.finished(utt):
                return None
            job.speaking += 1  # this utterance is all spoken (or produced nothing)
        if not job.finished:  # every utterance is decoded and spoken
            job.finished = True
            job.send(DONE)
            self._lock.notify_all()  # its place is free: the decoding loop may admit another
        return None

    def _speak(self, ready: list[tuple[Job, Chunk]]) -> None:
        try:
            results = self.audio.run([chunk for _, chunk in ready])
        except Exception as e:
            results = [e] * len(ready)
        now = time.monotonic()
        for (job, _), audio in zip(ready, results, strict=True):
            if isinstance(audio, Exception):
                job.log(logging.WARNING, "Audio failed", error=audio)
                job.fail(audio)
                continue
            if job.first_audio_at is None:
                job.first_audio_at = now
            job.audio_s += audio.size / self.audio.sample_rate
            if audio.size:
                job.send(audio)
        with self._lock:
            self._lock.notify_all()

    def _new_stream(self, high_priority: bool = False) -> Any:
        """A stream of a loop's own (None off CUDA); a high-priority one has its kernels (graph
        replays included) scheduled ahead of the other loop's whenever both have work queued."""
        device = self.decoder.device
        if device.type != "cuda":
            return None
        priority = -1 if high_priority else 0
        return torch.cuda.Stream(device=device, priority=priority)  # type: ignore[no-untyped-call]

    @staticmethod
    def _on(stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Work issued inside runs on `stream` (as it is where that is None)."""
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

