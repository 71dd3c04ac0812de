"""The Redis audio cache: exact bytes plus the headers that describe them, under a TTL.

Redis is an accelerator, never a dependency: every call is bounded by the cache budget (about
100 ms, plus the event loop's current lag; see gateway.budget), so that a saturated gateway
does not blame Redis for its own queueing. A call that fails or runs late is counted and served
as a miss. After a failure the cache is skipped for `retry_after_s`, so an unresponsive Redis
costs at most one budget per window instead of one per request; the first call after the
window probes Redis again, and caching resumes by itself when it answers. A call that runs
late while another call got its answer within the budget is a miss for its request only:
Redis is up, and that call queued behind others (a burst on a busy gateway).

Large entries are stored and read in pieces of `piece_bytes`, so that no single call moves
megabytes and a hit streams from Redis as it is sent: the head key holds the headers and the
piece count, and the pieces sit beside it. Only a failing call, or a late head read (the
first call of a lookup, a few hundred bytes), marks Redis down; a piece that is slow to
arrive under load is waited for up to `piece_timeout_s` and, if it never comes, aborts that
one response and nothing else. The head is the cache key itself; its pieces are
`{<cache key>}:<token>:<i>` (`piece_key`), so that under Redis Cluster every key of an
entry lives in the head's slot.

An entry is written once: `put` stores with NX, so a later synthesis (a `Cache-Control:
no-cache` refresh, or a second gateway's identical miss) never replaces an entry before its
TTL ends. The key fixes the bytes (sampling is seeded from the request), so a correct
refresh could only write the same bytes again, and one that differs must not overwrite them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisError

from gateway.budget import CallBudget
from gateway.memory_cap import ByteBudget
from gateway.metrics import GatewayMetrics
from gateway.redis_client import RedisClient

logger = logging.getLogger(__name__)

_MAGIC = b"TA1"
_MAGIC_PIECES = b"TA2"
_HEADER_LENGTH = struct.Struct(">I")
PIECE_READS_IN_FLIGHT = 4
PIECE_TTL_MARGIN_S = 600
"""Pieces outlive their head by this much, so a read that starts before the head expires ends."""
T = TypeVar("T")


class CacheTransferError(Exception):
    """A hit's piece did not arrive (slow, evicted or Redis failed): abort that response."""


@dataclass(frozen=True)
class CachedAudio:
    """A response body and the headers (Content-Type, X-Sample-Rate, ...) it needs.

    A small entry comes whole in `audio`; a large one leaves `audio` empty and comes as
    `stream`, every byte read from Redis piece by piece while it is sent.
    """

    audio: bytes
    headers: dict[str, str]
    stream: AsyncIterator[bytes] | None = None


def piece_key(cache_key: str, token: str, index: int) -> str:
    """`{<cache key>}:<token>:<index>`: the slot of a braced key is the hash of what the braces
    hold, here the cache key, whose own slot is the hash of the whole key (it has no braces)."""
    return f"{{{cache_key}}}:{token}:{index}"


@dataclass(frozen=True)
class _PiecesHead:
    headers: dict[str, str]
    size: int
    pieces: int
    token: str

    def piece_key(self, head_key: str, index: int) -> str:
        return piece_key(head_key, self.token, index)


def encode_head(head: _PiecesHead) -> bytes:
    meta = {"headers": head.headers, "size": head.size, "pieces": head.pieces, "token": head.token}
    header = json.dumps(meta, separators=(",", ":")).encode()
    return b"".join((_MAGIC_PIECES, _HEADER_LENGTH.pack(len(header)), header))


def _decode_head(value: bytes) -> _PiecesHead:
    meta, _ = _split(value)
    if not isinstance(meta, dict) or not isinstance(meta.get("headers"), dict):
        raise ValueError("cache entry head is not an object")
    headers: dict[str, str] = meta["headers"]
    try:
        return _PiecesHead(
            headers=headers,
            size=int(meta["size"]),
            pieces=int(meta["pieces"]),
            token=str(meta["token"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError("cache entry head lacks a field") from error


def _split(value: bytes) -> tuple[object, bytes]:
    start = len(_MAGIC) + _HEADER_LENGTH.size
    if len(value) < start:
        raise ValueError("truncated cache entry")
    (length,) = _HEADER_LENGTH.unpack_from(value, len(_MAGIC))
    return json.loads(value[start : start + length]), value[start + length :]


def encode_entry(entry: CachedAudio) -> bytes:
    """`TA1` + big-endian header length + JSON headers + the audio bytes, untouched."""
    header = json.dumps(entry.headers, separators=(",", ":")).encode()
    return b"".join((_MAGIC, _HEADER_LENGTH.pack(len(header)), header, entry.audio))


def decode_entry(value: bytes) -> CachedAudio:
    """Inverse of `encode_entry`; raises ValueError for anything it did not write."""
    if not value.startswith(_MAGIC):
        raise ValueError("not a cache entry")
    headers, audio = _split(value)
    if not isinstance(headers, dict):
        raise ValueError("cache entry headers are not an object")
    return CachedAudio(audio=audio, headers=headers)


class AudioCache:
    def __init__(
        self,
        client: RedisClient,
        *,
        metrics: GatewayMetrics,
        ttl_s: int,
        max_entry_bytes: int,
        budget_s: float,
        retry_after_s: float,
        piece_bytes: int = 256 * 1024,
        piece_timeout_s: float = 5.0,
        memory: ByteBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        loop_lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._max_entry_bytes = max_entry_bytes
        self._budget_s = budget_s
        self._retry_after_s = retry_after_s
        self._piece_bytes = piece_bytes
        self._piece_timeout_s = piece_timeout_s
        self._memory = memory or ByteBudget(1 << 62)
        self._clock = clock
        self._loop_lag = loop_lag
        self._down_until = 0.0
        self._last_answer = float("-inf")
        # Few piece reads at a time: 40 replies of a piece each, parsed back to back, would
        # hold the loop long enough that a head read waiting behind them runs out of budget.
        self._piece_reads = asyncio.Semaphore(PIECE_READS_IN_FLIGHT)

    @property
    def max_entry_bytes(self) -> int:
        return self._max_entry_bytes

    def available(self) -> bool:
        """False while the cache is being skipped after a Redis failure."""
        return self._clock() >= self._down_until

    async def get(self, key: str) -> CachedAudio | None:
        """The entry under `key`, or None on a miss, a Redis fault or an unreadable value.

        For an entry in pieces only the head is read here; the rest is read as the returned
        `stream` is consumed, which raises CacheTransferError if a piece never comes.
        """
        head_key = key
        value = await self._call("get", lambda: self._client.get(head_key))
        if value is None:
            return None
        raw = value if isinstance(value, bytes) else value.encode()
        try:
            if raw.startswith(_MAGIC_PIECES):
                head = _decode_head(raw)
                return CachedAudio(
                    audio=b"", headers=head.headers, stream=self._read_pieces(head_key, head)
                )
            return decode_entry(raw)
        except ValueError:
            self._metrics.cache_errors.labels(operation="decode").inc()
            logger.warning("unreadable cache entry %s is ignored", key)
            return None

    async def put(self, key: str, entry: CachedAudio) -> bool:
        """Store a complete response with the TTL, unless an entry is there already.

        False when too large, already stored, or Redis failed. Pieces go first, the head last:
        a reader sees the entry only once every piece is in Redis.
        """
        audio = entry.audio
        if len(audio) > self._max_entry_bytes:
            self._metrics.cache_stores.labels(result="too_large").inc()
            return False
        head_key = key
        if len(audio) <= self._piece_bytes:
            stored = await self._set(head_key, encode_entry(entry))
        else:
            stored = await self._put_pieces(head_key, entry)
        result = "stored" if stored else ("failed" if stored is None else "kept")
        self._metrics.cache_stores.labels(result=result).inc()
        return bool(stored)

    async def _put_pieces(self, head_key: str, entry: CachedAudio) -> bool | None:
        audio, size = entry.audio, self._piece_bytes
        if await self._call("get", lambda: self._client.exists(head_key)):
            return False
        head = _PiecesHead(
            headers=entry.headers,
            size=len(audio),
            pieces=(len(audio) + size - 1) // size,
            token=secrets.token_hex(4),
        )
        ttl = self._ttl_s + PIECE_TTL_MARGIN_S
        for index in range(head.pieces):
            piece_key = head.piece_key(head_key, index)
            piece = audio[index * size : (index + 1) * size]
            if not await self._call("set", _setter(self._client, piece_key, piece, ttl)):
                return None  # the pieces written so far expire with their TTL
        stored = await self._set(head_key, encode_head(head))
        if stored is False:  # another writer came first: drop this copy's pieces
            keys = [head.piece_key(head_key, index) for index in range(head.pieces)]
            await self._call("delete", lambda: self._client.delete(*keys))
        return stored

    async def _set(self, key: str, value: bytes) -> bool | None:
        """True when stored, False when the key exists, None when Redis failed."""

        async def set_once() -> bool:
            return bool(await self._client.set(key, value, ex=self._ttl_s, nx=True))

        return await self._call("set", set_once)

    async def _read_pieces(self, head_key: str, head: _PiecesHead) -> AsyncIterator[bytes]:
        """The entry's bytes, piece after piece, each counted in the gateway's byte budget
        from before it is read until the next one is asked for."""
        held = 0
        sent = 0
        try:
            for index in range(head.pieces):
                self._memory.release(held)
                held = 0
                await self._memory.reserve(self._piece_bytes)
                held = self._piece_bytes
                piece = await self._read_piece(head_key, head.piece_key(head_key, index))
                self._memory.release(held - len(piece))
                held = len(piece)
                yield piece
                sent += len(piece)
            if sent != head.size:
                self._metrics.cache_errors.labels(operation="piece").inc()
                raise CacheTransferError(f"entry {head_key} has {sent} of {head.size} bytes")
        finally:
            self._memory.release(held)

    async def _read_piece(self, head_key: str, piece_key: str) -> bytes:
        try:
            async with CallBudget(self._piece_timeout_s + self._loop_lag()), self._piece_reads:
                value = await self._client.get(piece_key)
            self._last_answer = self._clock()
        except TimeoutError as error:
            # A slow transfer, not a Redis that is down: only this response pays for it.
            self._metrics.cache_errors.labels(operation="piece").inc()
            raise CacheTransferError(f"a piece of {head_key} was too slow") from error
        except (RedisError, OSError) as error:
            self._metrics.cache_errors.labels(operation="piece").inc()
            self._mark_down("piece", error)
            raise CacheTransferError(f"a piece of {head_key} failed") from error
        if value is None:
            # Evicted or expired before its head: drop the head so the next request misses.
            self._metrics.cache_errors.labels(operation="piece").inc()
            await self._call("delete", lambda: self._client.delete(head_key))
            raise CacheTransferError(f"a piece of {head_key} is gone")
        return value if isinstance(value, bytes) else value.encode()

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T | None:
        if not self.available():
            self._metrics.cache_skipped.labels(operation=operation).inc()
            return None
        try:
            async with CallBudget(self._budget_s + self._loop_lag()):
                result = await call()
        except TimeoutError as error:
            self._metrics.cache_errors.labels(operation=operation).inc()
            if self._clock() - self._last_answer > self._budget_s:
                self._mark_down(operation, error)
            # Else another call got its answer within the budget: Redis is up and this call
            # was late behind the others. It is served uncached; the cache stays in use.
            return None
        except (RedisError, OSError) as error:
            self._metrics.cache_errors.labels(operation=operation).inc()
            self._mark_down(operation, error)
            return None
        self._last_answer = self._clock()
        if self._down_until:
            logger.warning("Redis answers again; caching resumes")
            self._down_until = 0.0
        return result

    def _mark_down(self, operation: str, error: BaseException) -> None:
        if self._down_until == 0.0:
            name = type(error).__name__
            logger.warning("Redis %s failed (%s); serving uncached", operation, name)
        self._down_until = self._clock() + self._retry_after_s


def _setter(client: RedisClient, key: str, value: bytes, ttl: int) -> Callable[[], Awaitable[bool]]:
    async def set_piece() -> bool:
        return bool(await client.set(key, value, ex=ttl))

    return set_piece
