from pathlib import Path

import redis

from tests.support.processes import redis_server


def test_redis_server_starts_with_cluster_policy(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as server:
        client = redis.Redis(port=server.port)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.set("k", b"v", ex=5)
        assert client.get("k") == b"v"
    assert server.process.poll() is not None
