"""The gateway on a real three-node Redis Cluster (GATEWAY_REDIS_CLUSTER=true).

The nodes are Debian's redis-server in cluster mode on free loopback ports, joined with
`redis-cli --cluster create`; the worker is a real Piper worker. Cache entries spread over the
nodes and each entry's keys stay on one node; identical concurrent misses synthesize once;
registered voices work in transactions. With one node hung, then stopped, requests are served
uncached within the cache budget, entries on the other nodes are still hits, and when the node
comes back its entries (kept in its append-only file) are hits again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import numpy as np
import pytest
import redis
from redis.asyncio import RedisCluster

from gateway.cache import AudioCache
from gateway.metrics import GatewayMetrics
from gateway.redis_client import redis_client, voice_key_prefix
from gateway.voices import VOICE_INDEX_KEY, RegisteredVoice, VoiceStore
from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service
from tests.support.redis_cluster import ClusterNode, cluster_ok, redis_cluster

TEXTS = [f"Cached sentence number {n}." for n in range(6)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("redis-cluster")
    worker_port, gateway_port = free_port(), free_port()
    with redis_cluster(root / "redis") as nodes, python_service(
        "worker",
        {"WORKER_PORT": str(worker_port), "WORKER_THREADS": "1", "WORKER_MAX_QUEUE": "16"},
        port=worker_port,
        log_dir=root,
        timeout=180.0,
    ) as worker, python_service(
        "gateway",
        {
            "GATEWAY_PORT": str(gateway_port),
            "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{nodes[0].port}/0",
            "GATEWAY_REDIS_CLUSTER": "true",
            "GATEWAY_WORKER_URL": worker.url,
        },
        port=gateway_port,
        log_dir=root,
    ) as gateway:
        yield {"nodes": nodes, "worker": worker, "gateway": gateway}


def _nodes(stack: dict[str, object]) -> list[ClusterNode]:
    nodes = stack["nodes"]
    assert isinstance(nodes, list)
    return nodes


def _process(stack: dict[str, object], name: str) -> RunningProcess:
    process = stack[name]
    assert isinstance(process, RunningProcess)
    return process


def speech(client: httpx.Client, text: str) -> httpx.Response:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}
    return client.post("/v1/audio/speech", json=body, timeout=120)


def check_speech(response: httpx.Response, text: str) -> None:
    assert response.status_code == 200, response.text
    decoded = decode(response.content, "wav", 22050)
    words = len(text.split())
    assert 0.15 * words <= decoded.duration <= words + 1.0, decoded.duration
    assert decoded.rms > 0.01, "silence"


def syntheses(worker: RunningProcess) -> float:
    for line in httpx.get(f"{worker.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("worker_syntheses_started_total "):
            return float(line.split()[1])
    raise AssertionError("worker_syntheses_started_total missing")


def cache_errors(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('gateway_cache_errors_total{operation="get"} '):
            return float(line.split()[1])
    return 0.0


def holders(nodes: list[ClusterNode], cache_key: str) -> dict[int, list[str]]:
    """Node port -> the keys of the entry `cache_key` that node holds (found by its digest)."""
    digest = cache_key.rsplit(":", 1)[1]
    found = {}
    for node in nodes:
        keys = redis.Redis(port=node.port, decode_responses=True).keys(f"*{digest}*")
        if keys:
            found[node.port] = sorted(str(key) for key in keys)
    return found


def test_entries_spread_over_the_nodes_each_on_one(stack: dict[str, object]) -> None:
    nodes = _nodes(stack)
    with httpx.Client(base_url=_process(stack, "gateway").url) as client:
        placement = {}
        for text in TEXTS:
            first = speech(client, text)
            check_speech(first, text)
            assert first.headers["X-Cache"] == "MISS"
            second = speech(client, text)
            assert second.headers["X-Cache"] == "HIT"
            # The same samples (a cached WAV's header carries the true length, a stream's not).
            assert np.array_equal(
                decode(second.content, "wav").samples, decode(first.content, "wav").samples
            )
            where = holders(nodes, first.headers["X-Cache-Key"])
            assert len(where) == 1, where
            placement[text] = next(iter(where))
    assert len(set(placement.values())) >= 2, placement
    stack["placement"] = placement


def test_concurrent_identical_misses_synthesize_once(stack: dict[str, object]) -> None:
    worker = _process(stack, "worker")
    before = syntheses(worker)
    text = "Eight callers ask the cluster for this at once."
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=_process(stack, "gateway").url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/audio/speech", json=body) for _ in range(8)))

    responses = asyncio.run(run())
    assert len({decode(r.content, "wav").samples.tobytes() for r in responses}) == 1
    check_speech(responses[0], text)
    assert syntheses(worker) - before == 1


def test_voices_live_in_one_slot_and_work_in_transactions(stack: dict[str, object]) -> None:
    nodes = _nodes(stack)
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
    prefix = voice_key_prefix(cluster=True)

    async def round_trip() -> None:
        client = redis_client(f"redis://127.0.0.1:{nodes[1].port}/0", 2.0, cluster=True)
        assert isinstance(client, RedisCluster)
        store = VoiceStore(client, timeout_s=2.0, key_prefix=prefix)
        await store.save(voice)
        assert await store.get(voice.id) == replace(voice, features=b"")
        assert await store.features(voice.id) == voice.features
        assert [v.id for v in await store.list()] == [voice.id]
        assert await client.ttl(prefix + voice.id) == -1
        assert client.keyslot(prefix + voice.id) == client.keyslot(VOICE_INDEX_KEY)
        assert await store.delete(voice.id)
        assert await store.get(voice.id) is None
        await client.aclose()

    asyncio.run(round_trip())


def _miss_costs(port: int, cache_key: str) -> float:
    """Seconds one cache lookup of `cache_key` takes through a fresh cluster client."""

    async def lookup() -> float:
        client = redis_client(f"redis://127.0.0.1:{port}/0", 0.1, cluster=True)
        cache = AudioCache(
            client,
            metrics=GatewayMetrics(),
            ttl_s=60,
            max_entry_bytes=1 << 20,
            budget_s=0.1,
            retry_after_s=1.0,
        )
        start = time.monotonic()
        assert await cache.get(cache_key) is None
        elapsed = time.monotonic() - start
        await client.aclose()
        return elapsed

    return asyncio.run(lookup())


def test_a_stopped_node_costs_its_entries_only_until_it_returns(
    stack: dict[str, object],
) -> None:
    nodes = _nodes(stack)
    placement = stack.get("placement")
    if not isinstance(placement, dict):
        pytest.skip("needs the placement found by the first test")
    down = next(node for node in nodes if node.port in placement.values())
    alive = next(node for node in nodes if node is not down)
    lost = [text for text, port in placement.items() if port == down.port]
    kept = [text for text, port in placement.items() if port != down.port]
    assert lost
    assert kept
    with httpx.Client(base_url=_process(stack, "gateway").url) as client:
        lost_key = speech(client, lost[0]).headers["X-Cache-Key"]
        errors_before = cache_errors(client)
        # A hung node (it accepts connections, never answers) costs a lookup the cache budget
        # (0.1 s, with one grace period), not a socket timeout.
        down.pause()
        assert _miss_costs(alive.port, lost_key) < 1.0
        response = speech(client, lost[0])
        check_speech(response, lost[0])
        assert response.headers["X-Cache"] == "MISS"
        down.stop()
        # Entries of the stopped node: served, uncached, and counted as cache errors.
        for text in lost:
            response = speech(client, text)
            check_speech(response, text)
            assert response.headers["X-Cache"] == "MISS"
        assert cache_errors(client) > errors_before
        assert client.get("/readyz").status_code == 200
        # Entries of the other nodes are still there: hits once the gateway tries Redis again.
        deadline = time.monotonic() + 30
        for text in kept:
            while speech(client, text).headers["X-Cache"] != "HIT":
                assert time.monotonic() < deadline, f"{text!r} was lost from a surviving node"
        down.start()
        assert down.process is not None
        deadline = time.monotonic() + 30
        while not all(cluster_ok(node.port) for node in nodes):
            assert time.monotonic() < deadline, "the cluster did not recover"
            time.sleep(0.1)
        # The returning node's entries come back from its append-only file.
        for text in lost:
            while (response := speech(client, text)).headers["X-Cache"] != "HIT":
                assert time.monotonic() < deadline, "caching did not resume"
            check_speech(response, text)
