"""The gateway's Redis client choice (one server, Cluster, Sentinel) and the hash tags that keep
related keys in one slot."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot

from gateway.redis_client import redis_client, redis_for, sentinel_client, voice_key_prefix
from gateway.settings import GatewaySettings
from gateway.voices import VOICE_INDEX_KEY, VOICE_KEY_PREFIX


def test_one_server_unless_the_cluster_is_asked_for() -> None:
    assert GatewaySettings().redis_cluster is False
    assert GatewaySettings(redis_cluster=True).redis_cluster is True

    async def build() -> tuple[object, object]:
        single = redis_client("redis://127.0.0.1:1/0", 0.1)
        cluster = redis_client("redis://127.0.0.1:1/0", 0.1, cluster=True)
        await single.aclose()
        await cluster.aclose()
        return single, cluster

    single, cluster = asyncio.run(build())
    assert isinstance(single, Redis)
    assert isinstance(cluster, RedisCluster)


def test_voice_hashes_share_the_index_slot_in_a_cluster() -> None:
    prefix = voice_key_prefix(cluster=True)
    index_slot = key_slot(VOICE_INDEX_KEY.encode())
    for voice_id in ("narrator", "a", "voice_with_a_long_name_0123456789"):
        assert key_slot(f"{prefix}{voice_id}".encode()) == index_slot
    # Without the tag they scatter, which a transaction across them would refuse (CROSSSLOT).
    plain = {key_slot(f"{VOICE_KEY_PREFIX}{v}".encode()) for v in ("narrator", "a", "b")}
    assert plain != {index_slot}


def test_one_server_keeps_the_existing_voice_keys() -> None:
    assert voice_key_prefix(cluster=False) == VOICE_KEY_PREFIX == "voice:"


def test_sentinels_find_the_master_and_exclude_a_cluster() -> None:
    settings = GatewaySettings(redis_sentinels="10.0.0.1:26379, 10.0.0.2:26379")  # type: ignore[arg-type]
    assert settings.redis_sentinels == ["10.0.0.1:26379", "10.0.0.2:26379"]
    with pytest.raises(ValidationError, match="exclude each other"):
        GatewaySettings(redis_cluster=True, redis_sentinels=["10.0.0.1:26379"])

    async def build() -> Redis:
        chosen = GatewaySettings(redis_url="redis://:secret@x:1/3", redis_sentinels=["h:1"])
        client = redis_for(chosen, 0.1)
        await client.aclose()
        assert isinstance(client, Redis)
        return client

    client = asyncio.run(build())
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "tts"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "secret"
    with pytest.raises(ValueError, match="host:port"):
        sentinel_client(["no-port"], "tts", "redis://x/0", 0.1)
