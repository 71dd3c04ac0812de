"""Two workers of different model versions behind one gateway (a rolling upgrade), and the
complete files the gateway hands out once it knows the whole body.

nginx round-robins the gateway's misses over a worker of the gateway's model version and one of
another (Piper with another gain: another model version). Audio made by the other version is
served but never cached under the key's version; every cached hit is the key's version's own
audio, byte for byte. Cached FLAC and WAV, and batch items, carry their true lengths.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile

from cluster.nginx_config import nginx_binary
from contract.audio import AudioFormat
from contract.complete_audio import complete_file
from tests.integration.test_gateway_integration import gateway, worker
from tests.support.processes import (
    RunningProcess,
    free_port,
    http_ok,
    redis_server,
    wait_until_ready,
)

TEXTS = [f"Sentence {word} of the upgrade check." for word in ("one", "two", "three", "four")]
WORKER_ENV = {"WORKER_MAX_CONCURRENCY": "1"}


def _nginx_conf(root: Path, port: int, upstreams: list[str]) -> Path:
    servers = "\n".join(f"        server {url.removeprefix('http://')};" for url in upstreams)
    conf = root / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream workers {{
{servers}
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    )
    return conf


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("upgrade")
    with (
        redis_server(root / "redis") as store,
        worker(root, **WORKER_ENV) as old,
        worker(root, WORKER_ENGINE_OPTIONS='{"gain": 0.8}', **WORKER_ENV) as new,
    ):
        port = free_port()
        conf = _nginx_conf(root, port, [old.url, new.url])
        log = root / "nginx.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [nginx_binary(), "-c", str(conf), "-p", str(root)], stdout=out, stderr=out
            )
        balancer = RunningProcess(process=process, port=port, log_path=log)
        try:
            wait_until_ready(lambda: http_ok(f"{balancer.url}/livez"), process, log, 20.0)
            # The gateway keys with the version of whichever worker answered its first
            # GET /v1/info; the tests ask it which one that was.
            with gateway(root, store.port, balancer.url) as front:
                versions = {
                    url: httpx.get(f"{url}/v1/info", timeout=10).json()["model_version"]
                    for url in (old.url, new.url)
                }
                assert len(set(versions.values())) == 2
                yield {
                    "gateway": front,
                    "versions": versions,
                    "balancer": balancer,
                    "old": old,
                    "new": new,
                }
        finally:
            balancer.stop()


def _key_version(gateway_url: str) -> str:
    models = httpx.get(f"{gateway_url}/v1/models", timeout=10).json()
    version: str = models["data"][0]["capabilities"]["model_version"]
    return version


def _mismatches(gateway_url: str) -> float:
    metrics = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    found = re.search(r"^gateway_cache_version_mismatch_total (\S+)$", metrics, re.M)
    assert found, "the mismatch counter is exported"
    return float(found.group(1))


def test_only_the_keys_version_is_cached(upgrade: dict[str, object]) -> None:
    front = upgrade["gateway"]
    assert isinstance(front, RunningProcess)
    versions = upgrade["versions"]
    assert isinstance(versions, dict)
    key_version = _key_version(front.url)
    same = next(url for url, version in versions.items() if version == key_version)
    before = _mismatches(front.url)
    with httpx.Client(base_url=front.url, timeout=120) as client:
        for text in TEXTS:  # round robin: about half are made by the other version
            body = {"model": "tts-1", "input": text, "response_format": "flac"}
            first = client.post("/v1/audio/speech", json=body)
            assert first.status_code == 200, first.text
            assert first.headers["X-Cache"] == "MISS"
        mismatched = _mismatches(front.url) - before
        assert 0 < mismatched < len(TEXTS)
        hits = 0
        for text in TEXTS:
            body = {"model": "tts-1", "input": text, "response_format": "flac"}
            again = client.post("/v1/audio/speech", json=body)
            assert again.status_code == 200
            if again.headers["X-Cache"] != "HIT":
                continue
            hits += 1
            # A hit is the key version's own audio: what that worker makes for the request.
            direct = httpx.post(
                f"{same}/v1/synthesize",
                json={"text": text, "voice": "joe", "format": "flac"},
                timeout=120,
            )
            cached, rate = soundfile.read(io.BytesIO(again.content), dtype="int16")
            made, _ = soundfile.read(io.BytesIO(_complete(direct.content)), dtype="int16")
            assert rate == 22050
            assert (cached == made).all()
            assert len(cached) > rate  # about two seconds of speech
        assert hits == len(TEXTS) - mismatched


def _complete(flac: bytes) -> bytes:
    return complete_file(flac, AudioFormat.FLAC)


def test_complete_files_have_true_lengths(upgrade: dict[str, object]) -> None:
    front = upgrade["gateway"]
    assert isinstance(front, RunningProcess)
    text = "A complete file states its length."
    with httpx.Client(base_url=front.url, timeout=120) as client:
        streamed = client.post("/synthesize", data={"text": text, "format": "flac"})
        assert streamed.headers["X-Cache"] == "MISS"
        with pytest.raises((RuntimeError, ValueError, soundfile.LibsndfileError)):
            soundfile.read(io.BytesIO(streamed.content))  # a streamed miss: length unknown
        for _ in range(3):  # until the round robin lands on the key's version
            hit = client.post("/synthesize", data={"text": text, "format": "flac"})
            if hit.headers["X-Cache"] == "HIT":
                break
            client.post("/synthesize", data={"text": "Another one.", "format": "flac"})
        assert hit.headers["X-Cache"] == "HIT"
        audio, rate = soundfile.read(io.BytesIO(hit.content), dtype="float32")
        assert rate == 22050
        assert 1.0 < len(audio) / rate < 6.0
        assert float(abs(audio).max()) > 0.05
        batch = client.post(
            "/synthesize_batch",
            json={
                "items": [
                    {"text": "Batch item one.", "format": "wav"},
                    {"text": "Batch item two.", "format": "flac"},
                ]
            },
        )
        assert batch.status_code == 200
        wav_item, flac_item = batch.json()["results"]
    wav = base64.b64decode(wav_item["audio"])
    (riff_size,) = struct.unpack_from("<I", wav, 4)
    (data_size,) = struct.unpack_from("<I", wav, 40)
    assert (riff_size, data_size) == (len(wav) - 8, len(wav) - 44)
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert len(samples) == data_size // 2
    flac = base64.b64decode(flac_item["audio"])
    info = soundfile.info(io.BytesIO(flac))
    assert 0.5 < info.frames / info.samplerate < 6.0


def _status_line(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while b"\r\n" not in received:
            piece = sock.recv(4096)
            if not piece:
                break
            received += piece
    return received.split(b"\r\n", 1)[0]


def test_status_lines_carry_reason_phrases(upgrade: dict[str, object]) -> None:
    front, balancer = upgrade["gateway"], upgrade["balancer"]
    assert isinstance(front, RunningProcess)
    assert isinstance(balancer, RunningProcess)
    assert _status_line(balancer.port, "/livez") == b"HTTP/1.1 200 OK"  # a worker, via nginx
    assert _status_line(balancer.port, "/nowhere") == b"HTTP/1.1 404 Not Found"
    assert _status_line(front.port, "/healthz") == b"HTTP/1.1 200 OK"


def test_the_api_docs_are_served(upgrade: dict[str, object]) -> None:
    front = upgrade["gateway"]
    assert isinstance(front, RunningProcess)
    docs = httpx.get(f"{front.url}/docs", timeout=10)
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text
    assert httpx.get(f"{front.url}/openapi.json", timeout=10).json()["openapi"].startswith("3.")
