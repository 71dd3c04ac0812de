"""The gateway's Redis: one server, or a Redis Cluster through redis-py's own cluster client.

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

from typing import TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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


def voice_key_prefix(cluster: bool) -> str:
    """Prefix of a registered voice's hash: hash-tagged to the index's slot in a cluster."""
    return CLUSTER_VOICE_KEY_PREFIX if cluster else VOICE_KEY_PREFIX

