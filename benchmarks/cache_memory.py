"""Redis memory one cached second of audio costs, per response format.

Starts a local cluster (launcher; 1 gateway, 1 worker, its own Redis) on free ports in a
temporary run directory, asks for the same texts in every format through nginx, and reads
back from Redis what each stored entry occupies (`MEMORY USAGE` of every key of the entry,
found by the cache key's digest). Prints bytes of response and of Redis memory per second of
audio, the figures docs/kubernetes.md uses to size Redis and to say when to move to a cluster.

    .venv/bin/python benchmarks/cache_memory.py [--engine piper] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
import soundfile

from cluster import launcher
from cluster.probes import port_free
from cluster.settings import ClusterSettings

TEXTS = [
    "A short sentence to cache.",
    "A longer sentence, with a clause or two, that takes a few seconds to say aloud.",
    " ".join(["This paragraph is long enough to stand for a typical answer read aloud."] * 4),
]
SPEECH_FORMATS = ("mp3", "opus", "flac", "wav", "pcm")


@dataclass
class Row:
    audio_format: str
    audio_s: float = 0.0
    body_bytes: int = 0
    redis_bytes: int = 0
    keys: int = 0


def _free_block(count: int, start: int = 20000) -> int:
    for first in range(start, 60000, count + 1):
        if all(port_free("127.0.0.1", first + offset) for offset in range(count)):
            return first
    raise RuntimeError("no free ports")


def _settings(run_dir: Path, engine: str) -> ClusterSettings:
    base = _free_block(8)
    return ClusterSettings(
        run_dir=run_dir,
        engine=engine,
        workers=1,
        gateways=1,
        public_port=base,
        h2c_port=base + 1,
        internal_port=base + 2,
        redis_port=base + 3,
        gateway_base_port=base + 4,
        worker_base_port=base + 5,
        nginx_worker_processes="1",
        redis_maxmemory="512mb",
    )


def _entry_memory(store: redis.Redis, cache_key: str) -> tuple[int, int]:
    """Bytes and keys of one entry; waits for the gateway's write, which follows the response."""
    digest = cache_key.rsplit(":", 1)[1]
    deadline = time.monotonic() + 10
    while not (keys := list(store.scan_iter(match=f"*{digest}*", count=1000))):
        if time.monotonic() > deadline:
            return 0, 0
        time.sleep(0.05)
    total = sum(int(store.memory_usage(key, samples=0) or 0) for key in keys)
    return total, len(keys)


def measure(settings: ClusterSettings) -> list[Row]:
    rows = {name: Row(name) for name in (*SPEECH_FORMATS, "pcm_f32le")}
    store = redis.Redis(port=settings.redis_port)
    with httpx.Client(base_url=settings.public_url, timeout=300) as client:
        for text in TEXTS:
            wav = client.post(
                "/v1/audio/speech",
                json={"model": "tts-1", "input": text, "response_format": "wav"},
            )
            wav.raise_for_status()
            seconds = soundfile.info(io.BytesIO(wav.content)).duration
            for audio_format in rows:
                if audio_format == "pcm_f32le":
                    response = client.post("/synthesize", data={"text": text})
                else:
                    response = client.post(
                        "/v1/audio/speech",
                        json={"model": "tts-1", "input": text, "response_format": audio_format},
                    )
                response.raise_for_status()
                used, keys = _entry_memory(store, response.headers["X-Cache-Key"])
                if keys == 0:
                    raise RuntimeError(f"{audio_format}: nothing was cached for {text!r}")
                row = rows[audio_format]
                row.audio_s += seconds
                row.body_bytes += len(response.content)
                row.redis_bytes += used
                row.keys += keys
    return list(rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="piper")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="tts-cache-memory-"))
    run_dir.chmod(0o755)
    settings = _settings(run_dir, args.engine)
    try:
        launcher.up(settings)
        rows = measure(settings)
    finally:
        launcher.down(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(f"engine {args.engine}, {len(TEXTS)} texts, {rows[0].audio_s:.1f} s of audio per format")
    print(f"{'format':<10} {'body kB/s':>10} {'Redis kB/s':>11} {'keys':>5} {'MB per hour':>12}")
    for row in rows:
        per_s = row.redis_bytes / row.audio_s
        print(
            f"{row.audio_format:<10} {row.body_bytes / row.audio_s / 1000:>10.1f} "
            f"{per_s / 1000:>11.1f} {row.keys:>5} {per_s * 3600 / 1e6:>12.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
