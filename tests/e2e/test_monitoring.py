"""A real Prometheus beside a running local cluster (`make up MONITOR=1`).

The launcher starts one gateway, one Piper worker, Redis, nginx, Debian's Prometheus and Redis
exporter on free ports. Once Prometheus has scraped every process, traffic through nginx makes
every kind of event the dashboard shows happen for real: a cache miss then a hit, a 422, 503
`busy` (one worker slot, no queue, no gateway retries, three requests at once), and Redis
errors (Redis stopped with SIGSTOP for a request). Then every dashboard query and every
recording rule must return data and name only series Prometheus has scraped, and every
recorded series an alert selects (with its label matchers) must exist.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster import launcher, processes
from cluster.settings import ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports
from tests.support.monitoring import (
    BUILT_IN,
    alert_rules,
    dashboard_queries,
    metric_names,
    recording_rules,
)
from tests.support.processes import free_port

OPTIONAL_METRICS = {"worker_gpu_memory_bytes", "worker_gpu_memory_limit_bytes"}
RATE_WINDOW = "30s"
SETTLE_TIMEOUT_S = 45.0


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=1,
        workers=1,
        monitor=True,
        prometheus_port=free_port(),
        redis_exporter_port=free_port(),
        prometheus_scrape_interval="1s",
        ready_timeout=240,
    )
    with pytest.MonkeyPatch.context() as patch:
        # One slot, no queue, no retry: three requests at once get a real 503 busy.
        patch.setenv("WORKER_MAX_CONCURRENCY", "1")
        patch.setenv("WORKER_MAX_QUEUE", "0")
        patch.setenv("GATEWAY_UPSTREAM_BUSY_RETRIES", "0")
        try:
            launcher.up(settings)
            yield settings
        finally:
            records = launcher.load_records(settings)
            launcher.down(settings)
            assert not [record.name for record in records.values() if record.alive()]


def _speech(settings: ClusterSettings, text: str) -> httpx.Response:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}
    return httpx.post(f"{settings.public_url}/v1/audio/speech", json=body, timeout=120)


async def _busy_burst(public_url: str) -> list[int]:
    async with httpx.AsyncClient(base_url=public_url, timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/audio/speech",
                    json={"model": "tts-1", "input": f"Busy burst number {n}.", "voice": "alloy"},
                )
                for n in range(3)
            )
        )
    return [r.status_code for r in responses]


def _traffic(settings: ClusterSettings) -> None:
    first = _speech(settings, "Monitoring sees this sentence twice.")
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    again = _speech(settings, "Monitoring sees this sentence twice.")
    assert (again.status_code, again.headers["x-cache"]) == (200, "HIT")
    bad = _speech(settings, "")
    assert bad.status_code == 422
    assert 503 in asyncio.run(_busy_burst(settings.public_url))
    redis = launcher.load_records(settings)["redis"]
    processes.signal_record(redis, signal.SIGSTOP)
    try:
        uncached = _speech(settings, "Redis is not answering right now.")
    finally:
        processes.signal_record(redis, signal.SIGCONT)
    assert uncached.status_code == 200


def _query(settings: ClusterSettings, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{settings.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10
    )
    assert response.status_code == 200, (expr, response.text)
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def _scraped_names(settings: ClusterSettings) -> set[str]:
    response = httpx.get(f"{settings.prometheus_url}/api/v1/label/__name__/values", timeout=10)
    return set(response.json()["data"])


def _wait_for_data(settings: ClusterSettings, exprs: dict[str, str]) -> dict[str, str]:
    """Poll until every expression returns a sample; return those that never did."""
    pending = dict(exprs)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for name, expr in list(pending.items()):
            if _query(settings, expr):
                del pending[name]
        if pending:
            time.sleep(0.5)
    return pending


def _target_health(settings: ClusterSettings) -> dict[tuple[str, str], str]:
    """(job, instance) -> health, once every target has been scraped (or after the timeout).

    Counters born before Prometheus' first scrape would show no increase, so the traffic
    waits for this."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        response = httpx.get(f"{settings.prometheus_url}/api/v1/targets", timeout=10)
        targets = response.json()["data"]["activeTargets"]
        health = {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in targets}
        if len(health) == 4 and all(h == "up" for h in health.values()):
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scraped(cluster: ClusterSettings) -> ClusterSettings:
    health = _target_health(cluster)
    assert health == {
        ("gateway", f"127.0.0.1:{cluster.gateway_base_port}"): "up",
        ("worker", f"127.0.0.1:{cluster.worker_base_port}"): "up",
        ("redis", f"127.0.0.1:{cluster.redis_exporter_port}"): "up",
        ("prometheus", f"127.0.0.1:{cluster.prometheus_port}"): "up",
    }
    _traffic(cluster)
    return cluster


def test_every_process_stays_a_healthy_target(scraped: ClusterSettings) -> None:
    assert set(_target_health(scraped).values()) == {"up"}


def test_every_dashboard_query_returns_data(scraped: ClusterSettings) -> None:
    queries = {
        f"{title}: {expr}": expr.replace("$__rate_interval", RATE_WINDOW)
        for title, expr in dashboard_queries()
    }
    needed = {k: v for k, v in queries.items() if not metric_names(v) & OPTIONAL_METRICS}
    assert len(needed) >= 20
    assert _wait_for_data(scraped, needed) == {}
    names = set().union(*(metric_names(expr) for expr in queries.values()))
    missing = names - _scraped_names(scraped) - OPTIONAL_METRICS - BUILT_IN
    assert not missing, f"panels read series no process exports: {missing}"


def test_every_recording_rule_returns_data(scraped: ClusterSettings) -> None:
    rules = recording_rules()
    assert "tts:worker_underrun:ratio_rate5m" in rules
    assert _wait_for_data(scraped, {name: name for name in rules}) == {}


def test_every_recorded_series_an_alert_selects_exists(scraped: ClusterSettings) -> None:
    selectors = {
        selector
        for expr in alert_rules().values()
        for selector in re.findall(r"tts(?:_instance)?:\w+:\w+(?:\{[^}]*\})?", expr)
    }
    assert 'tts:gateway_time_to_first_byte_seconds:p99_5m{cache="MISS"}' in selectors
    assert _wait_for_data(scraped, {s: s for s in selectors}) == {}


def test_the_streams_were_measured_for_underrun(scraped: ClusterSettings) -> None:
    (count,) = _query(scraped, "sum(worker_stream_worst_gap_seconds_count)")
    (smooth,) = _query(scraped, "sum(worker_streams_without_underrun_total)")
    # Every 200 the worker streamed counts once; a short Piper sentence never waits.
    assert float(count["value"][1]) >= 3
    assert 1 <= float(smooth["value"][1]) <= float(count["value"][1])
