"""Hostile input and access rules through nginx, against a cluster that requires API keys.

Each case gets its 4xx as JSON, never a 5xx and never exception text, and the service keeps
serving afterwards.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import launcher
from cluster.settings import ClusterSettings
from tests.e2e.conftest import cluster_on_free_ports

KEY = "e2e-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
LEAKS = ("Traceback", 'File "', "Exception", "site-packages", "line ")


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[ClusterSettings]:
    settings = cluster_on_free_ports(
        run_dir,
        gateways=1,
        workers=1,
        max_body="2m",
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GATEWAY_API_KEYS", f"{KEY},e2e-key-2")
            launcher.up(settings)
        yield settings
    finally:
        launcher.down(settings)


def _assert_error(response: httpx.Response, status: int | tuple[int, ...]) -> str:
    expected = (status,) if isinstance(status, int) else status
    assert response.status_code in expected, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert not any(leak in error["message"] for leak in LEAKS), error
    code: str = error["code"]
    return code


def _still_serving(settings: ClusterSettings) -> None:
    response = httpx.post(
        f"{settings.public_url}/v1/audio/speech",
        json={"model": "tts-1", "input": "Still here.", "response_format": "wav"},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code == 200
    assert len(response.content) > 10_000


PUBLIC_ROUTES = [
    ("POST", "/v1/audio/speech"),
    ("POST", "/synthesize"),
    ("POST", "/synthesize_batch"),
    ("GET", "/v1/voices"),
    ("POST", "/v1/voices"),
    ("GET", "/v1/voices/some-voice"),
    ("DELETE", "/v1/voices/some-voice"),
    ("GET", "/v1/models"),
]


@pytest.mark.parametrize(("method", "path"), PUBLIC_ROUTES)
def test_every_public_route_needs_a_key(cluster: ClusterSettings, method: str, path: str) -> None:
    url = f"{cluster.public_url}{path}"
    assert _assert_error(httpx.request(method, url), 401) == "unauthorized"
    wrong = {"Authorization": "Bearer not-a-key"}
    assert _assert_error(httpx.request(method, url, headers=wrong), 401) == "unauthorized"
    assert httpx.request(method, url, headers=AUTH).status_code != 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_needs_no_key(cluster: ClusterSettings, path: str) -> None:
    assert httpx.get(f"{cluster.public_url}{path}").status_code == 200


@pytest.mark.parametrize(
    ("text", "statuses"),
    [
        ("e\u0301le\u0300ve a\u0300 l'e\u0301cole", (200,)),  # combining marks
        ("\u05e9\u05dc\u05d5\u05dd hello \u0645\u0631\u062d\u0628\u0627", (200, 422)),  # RTL
        ("Hello \U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467 world", (200, 422)),
        ("nul\u0000byte", (422,)),  # control characters are refused, never sent to espeak-ng
        ("\u200b\u200b\u200b", (422,)),  # only zero-width spaces
        ("x" * 100_000, (422,)),  # one 100k-character line
        ("   ", (422,)),
    ],
)
def test_unicode_edge_cases(
    cluster: ClusterSettings, text: str, statuses: tuple[int, ...]
) -> None:
    response = httpx.post(
        f"{cluster.public_url}/v1/audio/speech",
        json={"model": "tts-1", "input": text, "response_format": "wav"},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code in statuses, (response.status_code, response.text[:200])
    if response.status_code != 200:
        _assert_error(response, statuses)
    _still_serving(cluster)


@pytest.mark.parametrize(
    "voice_path", ["..%2F..%2Fetc%2Fpasswd", "a%00b", "%2e%2e", "voice%20id", "x" * 300]
)
def test_voice_ids_with_path_characters(cluster: ClusterSettings, voice_path: str) -> None:
    response = httpx.get(f"{cluster.public_url}/v1/voices/{voice_path}", headers=AUTH)
    _assert_error(response, (400, 404, 422))


@pytest.mark.parametrize("voice", ["../../etc/passwd", "a/b", "..", "x\u0000y"])
def test_speech_with_a_path_like_voice(cluster: ClusterSettings, voice: str) -> None:
    response = httpx.post(
        f"{cluster.public_url}/v1/audio/speech",
        json={"model": "tts-1", "input": "Hi.", "voice": voice},
        headers=AUTH,
    )
    _assert_error(response, (404, 422))


def test_oversized_and_malformed_bodies(cluster: ClusterSettings) -> None:
    url = f"{cluster.public_url}/synthesize"
    big = httpx.post(url, headers=AUTH, content=b"x" * (3 * 1024 * 1024))
    assert _assert_error(big, 413) == "payload_too_large"
    broken = httpx.post(
        url,
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zzz"},
        content=b"--zzz\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhi",
    )
    _assert_error(broken, (400, 422))
    no_boundary = httpx.post(
        url, headers={**AUTH, "Content-Type": "multipart/form-data"}, content=b"garbage"
    )
    _assert_error(no_boundary, (400, 415, 422))
    not_json = httpx.post(
        f"{cluster.public_url}/v1/audio/speech",
        headers={**AUTH, "Content-Type": "application/json"},
        content=b"{not json",
    )
    _assert_error(not_json, (400, 422))
    _still_serving(cluster)


def test_prompt_uploads_that_are_not_audio(cluster: ClusterSettings) -> None:
    url = f"{cluster.public_url}/synthesize"
    for payload in (b"not audio at all", b"RIFF\x00\x00\x00\x00WAVEjunk", b"\x00" * 500_000):
        response = httpx.post(
            url,
            headers=AUTH,
            data={"text": "Clone me.", "prompt_text": "hello"},
            files={"prompt_audio": ("p.wav", payload, "audio/wav")},
        )
        _assert_error(response, (413, 415, 422))
    _still_serving(cluster)


def test_header_injection_in_request_id_is_neutralised(cluster: ClusterSettings) -> None:
    host, port = "127.0.0.1", cluster.public_port
    raw = (
        "GET /healthz HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "X-Request-ID: abc%0d%0aSet-Cookie: stolen=1\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 200")
    assert "set-cookie" not in head
    request_ids = [line for line in head.split("\r\n") if line.startswith("x-request-id:")]
    assert len(request_ids) == 1
    assert "%0d" not in request_ids[0]
