"""Admission and disconnects against a real worker: one slot, a queue of one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service

LONG_TEXT = " ".join(
    f"Sentence {n} of a long text keeps the only synthesis slot of this worker busy for a while."
    for n in range(8)
)
SHORT_TEXT = "Short and sweet."


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProcess]:
    port = free_port()
    env = {
        "WORKER_PORT": str(port),
        "WORKER_MAX_CONCURRENCY": "1",
        "WORKER_MAX_QUEUE": "1",
        "WORKER_QUEUE_TIMEOUT_S": "120",
        "WORKER_RETRY_AFTER_S": "2",
    }
    with python_service("worker", env, port=port, log_dir=tmp_path_factory.mktemp("worker")) as w:
        yield w


async def wait_for(client: httpx.AsyncClient, *, active: int, waiting: int) -> None:
    """Poll /readyz until the admission counters match (generous limit: a loaded machine)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = (await client.get("/readyz")).json()
        if state["active"] == active and state["waiting"] == waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"admission never reached active={active} waiting={waiting}: {state}")


async def read_all(client: httpx.AsyncClient, text: str) -> httpx.Response:
    response = await client.post("/v1/synthesize", json={"text": text, "format": "wav"})
    await response.aread()
    return response


async def test_full_worker_refuses_at_once_and_serves_the_rest(worker: RunningProcess) -> None:
    async with httpx.AsyncClient(base_url=worker.url, timeout=120.0) as client:
        await wait_for(client, active=0, waiting=0)
        running_request = client.build_request(
            "POST", "/v1/synthesize", json={"text": LONG_TEXT, "format": "wav"}
        )
        running = await client.send(running_request, stream=True)
        assert running.status_code == 200
        body = bytearray()
        chunks = running.aiter_raw()
        body.extend(await anext(chunks))

        queued = asyncio.create_task(read_all(client, SHORT_TEXT))
        await wait_for(client, active=1, waiting=1)

        started = time.monotonic()
        refused = await client.post("/v1/synthesize", json={"text": SHORT_TEXT})
        refused_after = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "busy"
        assert refused_after < 5.0  # at once, not after the running synthesis

        async for chunk in chunks:
            body.extend(chunk)
        await running.aclose()
        long_audio = decode(bytes(body), "wav")
        assert long_audio.duration > 20
        short = await queued
        assert short.status_code == 200
        assert decode(short.content, "wav").duration > 0.5
        await wait_for(client, active=0, waiting=0)


async def test_disconnect_frees_the_slot(worker: RunningProcess) -> None:
    async with httpx.AsyncClient(base_url=worker.url, timeout=120.0) as client:
        await wait_for(client, active=0, waiting=0)
        before = _metric(await client.get("/metrics"), "worker_audio_seconds_total")
        async with client.stream(
            "POST", "/v1/synthesize", json={"text": LONG_TEXT, "format": "pcm_f32le"}
        ) as response:
            assert response.status_code == 200
            await anext(response.aiter_raw())
        # The client hung up after the first chunk: the slot frees without the rest being made.
        await wait_for(client, active=0, waiting=0)
        metrics = await client.get("/metrics")
        assert 'worker_requests_total{code="client_disconnected",status="200"}' in metrics.text
        produced = _metric(metrics, "worker_audio_seconds_total") - before
        assert produced < 20, f"{produced:.1f} s of audio made for a client that left"

        served = await read_all(client, SHORT_TEXT)
        assert served.status_code == 200
        assert decode(served.content, "wav").rms > 0.01


def _metric(response: httpx.Response, name: str) -> float:
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


async def test_queued_client_that_hangs_up_leaves_the_queue(worker: RunningProcess) -> None:
    async with httpx.AsyncClient(base_url=worker.url, timeout=120.0) as client:
        await wait_for(client, active=0, waiting=0)
        async with client.stream(
            "POST", "/v1/synthesize", json={"text": LONG_TEXT, "format": "pcm_f32le"}
        ) as running:
            chunks = running.aiter_raw()  # held: dropping it would close the stream
            await anext(chunks)
            before = _metric(await client.get("/metrics"), "worker_syntheses_started_total")
            async with httpx.AsyncClient(base_url=worker.url, timeout=120.0) as leaving:
                queued = asyncio.create_task(
                    leaving.post("/v1/synthesize", json={"text": SHORT_TEXT})
                )
                await wait_for(client, active=1, waiting=1)
                queued.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await queued
            async for _ in chunks:
                pass
        await wait_for(client, active=0, waiting=0)
        served = await read_all(client, SHORT_TEXT)
        assert served.status_code == 200
        metrics = await client.get("/metrics")
        # One more: the request served; the client that left never got a synthesis.
        assert _metric(metrics, "worker_syntheses_started_total") == before + 1
        assert 'worker_requests_total{code="client_disconnected",status="499"} 1.0' in metrics.text
