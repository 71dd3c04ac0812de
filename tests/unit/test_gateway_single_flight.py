import asyncio

import pytest

from gateway.single_flight import Flight, FlightAbortedError, SingleFlight


async def read_all(flight: Flight) -> bytes:
    try:
        return b"".join([chunk async for chunk in flight.chunks()])
    finally:
        flight.unsubscribe()


async def test_joiners_share_one_producer_and_get_every_byte() -> None:
    flights = SingleFlight()
    release = asyncio.Event()
    runs = 0

    async def produce(flight: Flight) -> None:
        nonlocal runs
        runs += 1
        flight.set_headers({"Content-Type": "audio/wav"})
        flight.append(b"ab")
        await release.wait()
        flight.append(b"cd")
        flight.finish()

    first = flights.start("k", produce)
    assert await first.headers() == {"Content-Type": "audio/wav"}
    reader = asyncio.create_task(read_all(first))
    await asyncio.sleep(0)
    late = flights.join("k")
    assert late is first
    late_reader = asyncio.create_task(read_all(late))
    release.set()
    assert await reader == b"abcd"
    assert await late_reader == b"abcd"
    assert runs == 1
    await asyncio.sleep(0)
    assert len(flights) == 0


async def test_error_before_headers_reaches_every_waiter() -> None:
    flights = SingleFlight()

    async def produce(flight: Flight) -> None:
        raise LookupError("no worker")

    flight = flights.start("k", produce)
    joined = flights.join("k")
    assert joined is flight
    for _ in range(2):
        with pytest.raises(LookupError):
            await flight.headers()


async def test_break_after_start_aborts_readers() -> None:
    flights = SingleFlight()

    async def produce(flight: Flight) -> None:
        flight.set_headers({})
        flight.append(b"partial")
        raise ConnectionError("worker died")

    flight = flights.start("k", produce)
    await flight.headers()
    with pytest.raises(FlightAbortedError):
        await read_all(flight)


async def test_last_subscriber_leaving_cancels_the_producer() -> None:
    flights = SingleFlight()
    cancelled = asyncio.Event()

    async def produce(flight: Flight) -> None:
        flight.set_headers({})
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    flight = flights.start("k", produce)
    await flight.headers()
    flight.unsubscribe()
    await asyncio.wait_for(cancelled.wait(), 5)
    await flights.aclose()
    assert len(flights) == 0


async def test_unkeyed_flights_are_private() -> None:
    flights = SingleFlight()

    async def produce(flight: Flight) -> None:
        flight.set_headers({})
        flight.finish()

    flight = flights.start(None, produce)
    assert flights.join("None") is None
    assert await read_all(flight) == b""
