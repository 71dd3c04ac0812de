"""Large cache entries in pieces, write-once entries, and the gateway's byte budget."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cache import CachedAudio, CacheTransferError
from gateway.memory_cap import ByteBudget
from tests.unit.test_gateway_cache import Clock, FakeRedis, make_cache, sample

HEADERS = {"Content-Type": "audio/pcm", "X-Sample-Rate": "24000"}
KEY = "tts:v1:0123456789abcdef0123456789abcdef"


class MeasuringRedis(FakeRedis):
    """Records the largest value one call moved, and can stall or drop piece reads."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.piece_delay = 0.0

    async def get(self, key: str) -> bytes | None:
        if key.startswith("{") and self.piece_delay:
            await asyncio.sleep(self.piece_delay)
        value = await super().get(key)
        self.largest = max(self.largest, len(value or b""))
        return value

    async def set(self, key: str, value: bytes, ex: int, nx: bool = False) -> bool | None:
        self.largest = max(self.largest, len(value))
        return await super().set(key, value, ex=ex, nx=nx)


def entry(size: int, fill: int = 7) -> CachedAudio:
    return CachedAudio(audio=bytes([fill]) * (size - 3) + b"end", headers=HEADERS)


async def read(found: CachedAudio | None) -> bytes:
    assert found is not None
    if found.stream is None:
        return found.audio
    return b"".join([piece async for piece in found.stream])


async def test_a_large_entry_moves_in_pieces_and_comes_back_exact() -> None:
    redis = MeasuringRedis()
    cache, _ = make_cache(redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000)
    stored = entry(10_500)
    assert await cache.put(KEY, stored)
    assert redis.largest <= 1000, "no call moves more than a piece"
    found = await cache.get(KEY)
    assert found is not None
    assert found.headers == HEADERS
    assert found.stream is not None
    assert await read(found) == stored.audio
    assert redis.largest <= 1000


async def test_every_key_of_an_entry_shares_the_cache_keys_hash_tag() -> None:
    redis = MeasuringRedis()
    cache, _ = make_cache(redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000)
    await cache.put(KEY, entry(5000))
    assert KEY in redis.values
    pieces = [key for key in redis.values if key != KEY]
    assert len(pieces) == 5
    assert all(key.startswith("{" + KEY + "}:") for key in pieces)


async def test_small_entries_stay_one_key() -> None:
    redis = MeasuringRedis()
    cache, _ = make_cache(redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000)
    await cache.put(KEY, entry(900))
    assert list(redis.values) == [KEY]
    found = await cache.get(KEY)
    assert found is not None
    assert found.stream is None
    assert len(found.audio) == 900


@pytest.mark.parametrize("size", [900, 5000])
async def test_an_entry_is_written_once(size: int) -> None:
    """A refresh (or a second gateway's miss) never replaces what is stored."""
    redis = MeasuringRedis()
    cache, metrics = make_cache(redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000)
    first = entry(size, fill=1)
    assert await cache.put(KEY, first)
    keys = set(redis.values)
    assert not await cache.put(KEY, entry(size, fill=2))
    assert set(redis.values) == keys, "the second copy leaves no pieces behind"
    assert await read(await cache.get(KEY)) == first.audio
    assert sample(metrics, "gateway_cache_stores_total", result="kept") == 1


async def test_a_slow_piece_aborts_that_response_and_leaves_the_cache_up() -> None:
    redis = MeasuringRedis()
    cache, metrics = make_cache(
        redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000, piece_timeout_s=0.05
    )
    await cache.put(KEY, entry(5000))
    found = await cache.get(KEY)
    redis.piece_delay = 0.5
    with pytest.raises(CacheTransferError):
        await read(found)
    assert cache.available(), "a slow transfer is not Redis being down"
    redis.piece_delay = 0.0
    assert await read(await cache.get(KEY)) == entry(5000).audio
    assert sample(metrics, "gateway_cache_errors_total", operation="piece") == 1


async def test_a_lost_piece_aborts_and_drops_the_entry() -> None:
    redis = MeasuringRedis()
    cache, _ = make_cache(redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000)
    await cache.put(KEY, entry(5000))
    del redis.values[next(key for key in redis.values if key.endswith(":2"))]
    with pytest.raises(CacheTransferError):
        await read(await cache.get(KEY))
    assert await cache.get(KEY) is None, "the next request misses and synthesizes again"


async def test_hit_pieces_are_counted_and_wait_for_room() -> None:
    redis = MeasuringRedis()
    memory = ByteBudget(1500)
    cache, _ = make_cache(
        redis, Clock(), max_entry_bytes=1 << 20, piece_bytes=1000, memory=memory
    )
    await cache.put(KEY, entry(5000))
    first, second = await cache.get(KEY), await cache.get(KEY)
    assert first is not None
    assert first.stream is not None
    assert second is not None
    assert second.stream is not None
    assert memory.held == 0, "nothing is counted before a reader starts"
    assert len(await anext(first.stream)) == 1000
    assert memory.held == 1000
    waiting = asyncio.ensure_future(anext(second.stream))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a piece waits until it fits under the cap"
    assert len(await anext(first.stream)) == 1000, "a reader's own next piece takes its room"
    await first.stream.aclose()  # type: ignore[attr-defined]
    assert len(await asyncio.wait_for(waiting, 1)) == 1000
    assert memory.held == 1000
    await second.stream.aclose()  # type: ignore[attr-defined]
    assert memory.held == 0
    assert memory.peak <= 1500


async def test_a_miss_body_is_counted_until_its_last_reader_leaves() -> None:
    from gateway.single_flight import Flight, SingleFlight

    memory = ByteBudget(10_000)
    release = asyncio.Event()

    async def produce(flight: Flight) -> None:
        flight.set_headers(HEADERS)
        flight.append(b"x" * 3000)
        flight.append(b"y" * 2000)
        await release.wait()
        flight.finish()

    flights = SingleFlight(memory=memory)
    flight = flights.start(KEY, produce)
    await flight.headers()
    await asyncio.sleep(0)
    assert memory.held == 5000
    release.set()
    body = b"".join([chunk async for chunk in flight.chunks()])
    await asyncio.sleep(0)
    assert len(body) == 5000
    assert memory.held == 5000, "a reader still holds the body"
    flight.unsubscribe()
    assert memory.held == 0


async def test_requests_are_refused_with_503_busy_while_the_cap_is_held() -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from gateway.memory_cap import ByteCapMiddleware

    async def ok(_: object) -> PlainTextResponse:
        return PlainTextResponse("audio")

    memory = ByteBudget(100)
    app = ByteCapMiddleware(
        Starlette(routes=[Route("/synthesize", ok, methods=["POST"]), Route("/healthz", ok)]),
        budget=memory,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        assert (await c.post("/synthesize")).status_code == 200
        memory.add(100)
        refused = await c.post("/synthesize")
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "busy"
        assert (await c.get("/healthz")).status_code == 200, "only new audio work is refused"
        memory.release(100)
        assert (await c.post("/synthesize")).status_code == 200


async def test_a_late_call_while_redis_answers_others_leaves_the_cache_up() -> None:
    redis, clock = MeasuringRedis(), Clock()
    cache, metrics = make_cache(redis, clock, budget_s=0.05)
    await cache.put(KEY, entry(500))
    redis.hang = True
    assert await cache.get(KEY) is None, "late: this request goes on uncached"
    assert cache.available(), "another call was answered just now: Redis is up"
    clock.now += 1.0
    assert await cache.get(KEY) is None
    assert not cache.available(), "nothing answered for longer than the budget: Redis is down"
    assert sample(metrics, "gateway_cache_errors_total", operation="get") == 2
