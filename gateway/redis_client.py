"""The gateway's Redis: one server, a Redis Cluster, or a master found through Redis Sentinel.

All three are redis-py's own clients. `GATEWAY_REDIS_SENTINELS=host:port,...` makes the gateway
ask the sentinels for the address of the master `GATEWAY_REDIS_SENTINEL_MASTER` on every new
connection, so after a failover it reconnects to the promoted replica by itself.

`GATEWAY_REDIS_CLUSTER=true` makes `GATEWAY_REDIS_URL` a seed node of a Redis Cluster: the
client reads the slot map from it, sends each command to the node that owns its key, follows
MOVED/ASK redirections and refreshes the map when nodes change. Keys that one call uses
together must share a hash slot; the layout below gives them a common hash tag (`{...}`):

- a registered voice's hash and the index of voices are written in one transaction, so voice
  hashes are `voice:{voices}:<id>`, whose slot is the slot of the index key `voices` (Redis
  hashes only what is inside the braces, and `voices` has none);
- an audio cache entry's keys (its head and, for a large entry, its pieces) carry the
  entry's digest as their hash tag (gateway.cache).

With one server the names stay as they were (`voice:<id>`), so existing data keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url

from gateway.settings import GatewaySettings

RedisClient: TypeAlias = Redis | RedisCluster

VOICE_KEY_PREFIX = "voice:"
# `{voices}` puts every voice hash in the slot of the index key `voices`.
CLUSTER_VOICE_KEY_PREFIX = "voice:{voices}:"


def redis_client(url: str, connect_timeout_s: float, *, cluster: bool = False) -> RedisClient:
    """An async client that fails fast: bounded connects and no hidden retries.

    Reads and writes have no socket timeout of their own: every caller bounds its whole call
    with `asyncio.timeout` (redis-py would otherwise start a task per command to time it). A
    cluster client keeps serving the slots of the nodes that answer when another node is down
    (`require_full_coverage=False`); calls for the missing node's keys fail and are served
    uncached.
    """
    if cluster:
        return RedisCluster.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=False,
        )
    client: Redis = Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return client


def sentinel_client(
    sentinels: Sequence[str], master: str, url: str, connect_timeout_s: float
) -> Redis:
    """The current master of `master`, as the sentinels report it; db and password from `url`.

    Sentinel queries are bounded by the same connect timeout; as with one server, commands have
    no socket timeout of their own (the caller bounds each call).
    """
    addresses = []
    for sentinel in sentinels:
        host, _, port = sentinel.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a sentinel is host:port, not {sentinel!r}")
        addresses.append((host, int(port)))
    parsed = parse_url(url)  # type: ignore[no-untyped-call]
    options = {key: value for key, value in parsed.items() if key not in ("host", "port")}
    manager = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        addresses,
        sentinel_kwargs={
            "socket_timeout": connect_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        },
    )
    client: Redis = manager.master_for(
        master,
        socket_timeout=None,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
    return client


def redis_for(settings: GatewaySettings, connect_timeout_s: float) -> RedisClient:
    """The client the settings ask for: Sentinel, Cluster, or one server."""
    if settings.redis_sentinels:
        return sentinel_client(
            settings.redis_sentinels,
            settings.redis_sentinel_master,
            settings.redis_url,
            connect_timeout_s,
        )
    return redis_client(settings.redis_url, connect_timeout_s, cluster=settings.redis_cluster)


def voice_key_prefix(cluster: bool) -> str:
    """Prefix of a registered voice's hash: hash-tagged to the index's slot in a cluster."""
    return CLUSTER_VOICE_KEY_PREFIX if cluster else VOICE_KEY_PREFIX

