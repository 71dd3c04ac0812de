import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.cache import AudioCache, CachedAudio, decode_entry, encode_entry
from gateway.metrics import GatewayMetrics


class FakeRedis:
    """In-memory stand-in for the two calls the cache makes."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}
        self.down = False
        self.hang = False
        self.calls = 0

    async def _check(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(10)
        if self.down:
            raise RedisConnectionError("refused")

    async def get(self, key: str) -> bytes | None:
        await self._check()
        return self.values.get(key)

    async def set(self, key: str, value: bytes, ex: int, nx: bool = False) -> bool | None:
        await self._check()
        if nx and key in self.values:
            return None
        self.values[key] = value
        self.ttls[key] = ex
        return True

    async def exists(self, key: str) -> int:
        await self._check()
        return int(key in self.values)

    async def delete(self, *keys: str) -> int:
        await self._check()
        return sum(self.values.pop(key, None) is not None for key in keys)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_cache(
    redis: FakeRedis, clock: Clock, **overrides: object
) -> tuple[AudioCache, GatewayMetrics]:
    metrics = GatewayMetrics()
    options = {"ttl_s": 60, "max_entry_bytes": 1000, "budget_s": 0.05, "retry_after_s": 1.0}
    options.update(overrides)
    cache = AudioCache(redis, metrics=metrics, clock=clock, **options)  # type: ignore[arg-type]
    return cache, metrics


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


ENTRY = CachedAudio(
    audio=b"\x00\x01" * 100, headers={"Content-Type": "audio/wav", "X-Sample-Rate": "22050"}
)


def test_entry_round_trip_keeps_exact_bytes() -> None:
    assert decode_entry(encode_entry(ENTRY)) == ENTRY


@pytest.mark.parametrize("value", [b"", b"RIFF....", b"TA1\x00\x00"])
def test_foreign_values_are_rejected(value: bytes) -> None:
    with pytest.raises(ValueError, match="cache entry"):
        decode_entry(value)


async def test_put_then_get_with_ttl() -> None:
    redis, clock = FakeRedis(), Clock()
    cache, metrics = make_cache(redis, clock)
    assert await cache.get("k") is None
    assert await cache.put("k", ENTRY)
    assert redis.ttls["k"] == 60
    assert await cache.get("k") == ENTRY
    assert sample(metrics, "gateway_cache_stores_total", result="stored") == 1


async def test_entries_above_the_cap_are_not_stored() -> None:
    redis, clock = FakeRedis(), Clock()
    cache, metrics = make_cache(redis, clock, max_entry_bytes=10)
    assert not await cache.put("k", ENTRY)
    assert redis.values == {}
    assert sample(metrics, "gateway_cache_stores_total", result="too_large") == 1


async def test_failure_is_a_counted_miss_then_skipped_then_recovers() -> None:
    redis, clock = FakeRedis(), Clock()
    cache, metrics = make_cache(redis, clock)
    await cache.put("k", ENTRY)
    redis.down = True
    assert await cache.get("k") is None
    assert sample(metrics, "gateway_cache_errors_total", operation="get") == 1
    assert not cache.available()
    calls = redis.calls
    assert await cache.get("k") is None
    assert redis.calls == calls, "Redis is skipped inside the retry window"
    assert sample(metrics, "gateway_cache_skipped_total", operation="get") == 1
    redis.down = False
    clock.now += 1.5
    assert await cache.get("k") == ENTRY
    assert cache.available()


async def test_unresponsive_redis_is_bounded_by_the_budget() -> None:
    redis, clock = FakeRedis(), Clock()
    cache, metrics = make_cache(redis, clock, budget_s=0.05)
    redis.hang = True
    started = asyncio.get_running_loop().time()
    assert await cache.get("k") is None
    assert asyncio.get_running_loop().time() - started < 2.0
    assert sample(metrics, "gateway_cache_errors_total", operation="get") == 1


async def test_budget_cuts_off_a_call_that_never_answers() -> None:
    from gateway.budget import CallBudget

    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with CallBudget(0.02):
            await never.wait()


async def test_budget_forgives_a_stalled_loop_once() -> None:
    import time

    from gateway.budget import CallBudget

    ready = asyncio.get_running_loop().create_future()

    def answer_after_stall() -> None:
        time.sleep(0.08)  # the whole loop stalls past the budget; the reply is then ready
        ready.set_result("reply")

    async with CallBudget(0.02, stall_s=0.01, grace_s=0.05):
        asyncio.get_running_loop().call_later(0.005, answer_after_stall)
        assert await ready == "reply"
