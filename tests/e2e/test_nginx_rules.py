"""nginx's rules, checked against stand-in upstreams: retries, busy, limits, ids, exposure, h2c.

The configuration is the one the launcher renders from nginx/cluster.conf.template; only the
gateways and workers are replaced by tests/e2e/stub_upstream.py, so that each rule can be
provoked on purpose (a refused connection, a 503, a held stream).
"""

from __future__ import annotations

import functools
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster import nginx_config, probes, processes
from cluster.processes import ProcessRecord
from cluster.settings import REPO_ROOT, ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Stack:
    settings: ClusterSettings
    gateways: list[ProcessRecord]
    workers: list[ProcessRecord]

    @property
    def public(self) -> str:
        return self.settings.public_url

    @property
    def internal(self) -> str:
        return self.settings.internal_url


def _start(name: str, argv: list[str], port: int, settings: ClusterSettings) -> ProcessRecord:
    return processes.spawn(
        name,
        argv,
        env={"PATH": "/usr/bin:/bin:/usr/sbin"},
        cwd=REPO_ROOT,
        log_path=settings.log_dir / f"{name}.log",
        port=port,
        pid_dir=settings.pid_dir,
    )


def _wait(check: Callable[[], bool], record: ProcessRecord, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert record.alive(), Path(record.log_path).read_text()
        assert time.monotonic() < deadline, f"{record.name} not ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(run_dir: Path) -> Iterator[Stack]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=2,
        workers=2,
        rate_per_addr="10r/s",
        burst_per_addr=20,
        rate_per_key="10r/s",
        burst_per_key=3,
        max_body="1m",
    )
    stub = [sys.executable, "-m", "tests.e2e.stub_upstream"]
    records: list[ProcessRecord] = []
    try:
        gateways = [
            _start(f"gateway-{i}", [*stub, str(port), "ok"], port, settings)
            for i, port in enumerate(settings.gateway_ports())
        ]
        modes = ["ok", "busy"]
        workers = [
            _start(f"worker-{i}", [*stub, str(port), modes[i]], port, settings)
            for i, port in enumerate(settings.worker_ports())
        ]
        records = [*gateways, *workers]
        paths = nginx_config.write_config(settings)
        nginx = _start("nginx", nginx_config.nginx_command(paths), settings.public_port, settings)
        records.append(nginx)
        for record in records:
            url = (
                f"{settings.public_url}/healthz"
                if record.name == "nginx"
                else f"http://127.0.0.1:{record.port}/readyz"
            )
            _wait(functools.partial(probes.http_ready, url), record)
        yield Stack(settings=settings, gateways=gateways, workers=workers)
    finally:
        for record in reversed(records):
            processes.stop(record)


def test_request_id_is_generated_and_echoed_once(stack: Stack) -> None:
    response = httpx.post(f"{stack.public}/v1/audio/speech", json={})
    assert response.status_code == 200
    ids = response.headers.get_list("X-Request-ID")
    assert len(ids) == 1
    assert HEX_ID.match(ids[0])
    assert response.json()["request_id"] == ids[0]


def test_request_id_from_the_client_is_passed_through(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.public}/synthesize", headers={"X-Request-ID": "client-id.42:a_b"}
    )
    assert response.headers["X-Request-ID"] == "client-id.42:a_b"
    assert response.json()["request_id"] == "client-id.42:a_b"


@pytest.mark.parametrize(
    "hostile", ["a b", "x" * 129, "<script>", "id;drop", "id%0d%0aSet-Cookie:x=1"]
)
def test_unsafe_request_ids_are_replaced(stack: Stack, hostile: str) -> None:
    response = httpx.post(f"{stack.public}/synthesize", headers={"X-Request-ID": hostile})
    assert HEX_ID.match(response.headers["X-Request-ID"])
    assert response.json()["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    "path", ["/metrics", "/v1/synthesize", "/v1/info", "/livez", "/nginx_status", "/x"]
)
def test_internal_routes_are_not_public(stack: Stack, path: str) -> None:
    for method in ("GET", "POST"):
        response = httpx.request(method, f"{stack.public}{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_internal_listener_reaches_workers(stack: Stack) -> None:
    response = httpx.get(f"{stack.internal}/metrics")
    assert response.status_code in (200, 503)


def test_oversized_body_gets_413_json(stack: Stack) -> None:
    response = httpx.post(f"{stack.public}/synthesize", content=b"\0" * (2 * 1024 * 1024))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_worker_busy_is_passed_on_and_never_marks_the_worker_down(stack: Stack) -> None:
    statuses = [
        httpx.post(f"{stack.internal}/v1/synthesize", json={}).status_code for _ in range(12)
    ]
    assert set(statuses) == {200, 503}
    # Were a 503 counted as a failure, the busy worker would be skipped after its first one.
    assert statuses.count(503) >= 3, statuses


def test_busy_answer_keeps_retry_after_and_json(stack: Stack) -> None:
    for _ in range(6):
        response = httpx.post(f"{stack.internal}/v1/synthesize", json={})
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "busy"
            return
    pytest.fail("the busy worker never answered")


def test_stream_is_not_buffered(stack: Stack) -> None:
    # /stream is not a public route: it is reached through the internal listener.
    with httpx.stream("GET", f"{stack.internal}/stream", timeout=20) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        chunks = response.iter_raw()
        # The upstream holds the rest until released: the first chunk arrived unbuffered.
        assert next(chunks) == b"first"
        httpx.get(f"http://127.0.0.1:{response.headers['X-Stub-Port']}/release")
        assert b"".join(chunks) == b"second"


def test_http2_prior_knowledge(stack: Stack) -> None:
    version = nginx_config.nginx_version(nginx_config.nginx_binary())
    port = (
        stack.settings.public_port
        if version >= nginx_config.HTTP2_DIRECTIVE_SINCE
        else stack.settings.h2c_port
    )
    with httpx.Client(http1=False, http2=True) as client:
        response = client.post(f"http://127.0.0.1:{port}/v1/audio/speech", json={})
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200


def test_rate_limit_per_address_answers_429_json(stack: Stack) -> None:
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport) as client:
        responses = [client.get(f"{stack.public}/v1/models") for _ in range(60)]
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert limited[0].headers["Retry-After"] == "1"
    # Health checks are never limited.
    with httpx.Client(transport=transport) as client:
        assert client.get(f"{stack.public}/healthz").status_code == 200


def test_rate_limit_per_key(stack: Stack) -> None:
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(transport=transport) as client:
        keyed = [
            client.get(
                f"{stack.public}/v1/models", headers={"Authorization": "Bearer key-1"}
            ).status_code
            for _ in range(10)
        ]
        other_key = client.get(
            f"{stack.public}/v1/models", headers={"Authorization": "Bearer key-2"}
        )
    assert 429 in keyed
    assert other_key.status_code == 200


def test_killed_gateway_requests_go_to_the_other(stack: Stack) -> None:
    processes.stop(stack.gateways[1])
    for _ in range(10):
        response = httpx.post(f"{stack.public}/v1/audio/speech", json={"input": "x"})
        assert response.status_code == 200
        assert response.json()["port"] == stack.gateways[0].port


def test_all_gateways_down_gives_502_json(stack: Stack) -> None:
    processes.stop(stack.gateways[0])
    response = httpx.post(f"{stack.public}/v1/audio/speech", json={})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/v1/voices/a%00b", 400), ("/v1/voices/" + "x" * 9000, 414), ("/_errors/bad_request", 404)],
)
def test_requests_nginx_refuses_get_json(stack: Stack, path: str, status: int) -> None:
    response = httpx.get(f"{stack.public}{path}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] in ("invalid_request", "not_found")


def _raw(port: int, request: bytes) -> tuple[str, bytes]:
    """Send `request` as it is; return the status line + headers and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


@pytest.mark.parametrize("listener", ["public", "internal"])
@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n"
            b"Connection: close\r\n\r\n",
            501,
        ),
        (b"GET / HTTP/2.5\r\nHost: x\r\nConnection: close\r\n\r\n", 505),
    ],
    ids=["trace", "xchunked", "http-version"],
)
def test_errors_nginx_makes_before_any_location_are_json(
    stack: Stack, listener: str, request_head: bytes, status: int
) -> None:
    settings = stack.settings
    port = settings.public_port if listener == "public" else settings.internal_port
    head, body = _raw(port, request_head)
    assert head.startswith(f"HTTP/1.1 {status}"), head
    assert "content-type: application/json" in head.lower(), head
    assert json.loads(body)["error"]["code"] in ("method_not_allowed", "invalid_request")
