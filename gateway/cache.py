"""The Redis audio cache: exact bytes plus the headers that describe them, under a TTL.

Redis is an accelerator, never a dependency: every call is bounded by the cache budget (about
100 ms, plus the event loop's current lag; see gateway.budget), so that a saturated gateway
does not blame Redis for its own queueing. A call that fails or runs late is counted and served
as a miss. After a failure the cache is skipped for `retry_after_s`, so an unresponsive Redis
costs at most one budget per window instead of one per request; the first call after the
window probes Redis again, and caching resumes by itself when it answers.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisError

from gateway.budget import CallBudget
from gateway.metrics import GatewayMetrics
from gateway.redis_client import RedisClient

logger = logging.getLogger(__name__)

_MAGIC = b"TA1"
_HEADER_LENGTH = struct.Struct(">I")
T = TypeVar("T")


@dataclass(frozen=True)
class CachedAudio:
    """A complete response body and the headers (Content-Type, X-Sample-Rate, ...) it needs."""

    audio: bytes
    headers: dict[str, str]


def encode_entry(entry: CachedAudio) -> bytes:
    """`TA1` + big-endian header length + JSON headers + the audio bytes, untouched."""
    header = json.dumps(entry.headers, separators=(",", ":")).encode()
    return b"".join((_MAGIC, _HEADER_LENGTH.pack(len(header)), header, entry.audio))


def decode_entry(value: bytes) -> CachedAudio:
    """Inverse of `encode_entry`; raises ValueError for anything it did not write."""
    if not value.startswith(_MAGIC):
        raise ValueError("not a cache entry")
    start = len(_MAGIC) + _HEADER_LENGTH.size
    if len(value) < start:
        raise ValueError("truncated cache entry")
    (length,) = _HEADER_LENGTH.unpack_from(value, len(_MAGIC))
    headers = json.loads(value[start : start + length])
    if not isinstance(headers, dict):
        raise ValueError("cache entry headers are not an object")
    return CachedAudio(audio=value[start + length :], headers=headers)


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
        clock: Callable[[], float] = time.monotonic,
        loop_lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._max_entry_bytes = max_entry_bytes
        self._budget_s = budget_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._loop_lag = loop_lag
        self._down_until = 0.0

    @property
    def max_entry_bytes(self) -> int:
        return self._max_entry_bytes

    def available(self) -> bool:
        """False while the cache is being skipped after a Redis failure."""
        return self._clock() >= self._down_until

    async def get(self, key: str) -> CachedAudio | None:
        """The entry under `key`, or None on a miss, a Redis fault or an unreadable value."""
        value = await self._call("get", lambda: self._client.get(key))
        if value is None:
            return None
        try:
            return decode_entry(value if isinstance(value, bytes) else value.encode())
        except ValueError:
            self._metrics.cache_errors.labels(operation="decode").inc()
            logger.warning("unreadable cache entry %s is ignored", key)
            return None

    async def put(self, key: str, entry: CachedAudio) -> bool:
        """Store a complete response with the TTL; False when too large or Redis failed."""
        if len(entry.audio) > self._max_entry_bytes:
            self._metrics.cache_stores.labels(result="too_large").inc()
            return False
        value = encode_entry(entry)
        stored = await self._call("set", lambda: self._client.set(key, value, ex=self._ttl_s))
        self._metrics.cache_stores.labels(result="stored" if stored else "failed").inc()
        return bool(stored)

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T | None:
        if not self.available():
            self._metrics.cache_skipped.labels(operation=operation).inc()
            return None
        try:
            async with CallBudget(self._budget_s + self._loop_lag()):
                result = await call()
        except (RedisError, OSError, TimeoutError) as error:
            self._metrics.cache_errors.labels(operation=operation).inc()
            if self._down_until == 0.0:
                logger.warning(
                    "Redis %s failed (%s); serving uncached", operation, type(error).__name__
                )
            self._down_until = self._clock() + self._retry_after_s
            return None
        if self._down_until:
            logger.warning("Redis answers again; caching resumes")
            self._down_until = 0.0
        return result
