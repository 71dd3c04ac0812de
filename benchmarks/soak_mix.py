"""The soak's request mix: one request of a drawn kind, and whether its answer was expected.

Used by `benchmarks/soak.py` (see its docstring for the kinds and what each must get).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

PHRASES = [
    "Welcome back. Your order has shipped.",
    "The meeting starts in five minutes.",
    "Please hold while we connect your call.",
    "Turn left at the next intersection.",
    "Your balance is forty two dollars.",
    "Thank you for listening.",
]
WORDS = [
    "amber",
    "river",
    "quiet",
    "stone",
    "morning",
    "lantern",
    "orbit",
    "meadow",
    "signal",
    "copper",
    "harbor",
    "violet",
]
FORMATS = ["wav", "mp3", "flac", "opus", "pcm"]
KINDS = {"hit": 40, "miss": 20, "stream": 10, "disconnect": 8, "bad": 14, "info": 8}
BAD_BODIES: list[tuple[str, dict[str, object] | bytes]] = [
    ("empty", {"model": "tts-1", "input": ""}),
    ("nul", {"model": "tts-1", "input": "nul\u0000byte"}),
    ("too_long", {"model": "tts-1", "input": "word " * 1200}),
    ("format", {"model": "tts-1", "input": "Hi.", "response_format": "aac"}),
    ("speed", {"model": "tts-1", "input": "Hi.", "speed": 9.0}),
    ("voice", {"model": "tts-1", "input": "Hi.", "voice": "../../etc/passwd"}),
    ("model", {"model": "no-such-model", "input": "Hi."}),
    ("json", b"{not json"),
]


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int  # 0: no HTTP status (transport error)
    code: str  # the error code of a JSON error, the cache label of audio, or the exception
    seconds: float
    expected: bool
    body_bytes: int = 0


HitCheck = Callable[[str, bytes], bool]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def _unique(rng: random.Random, tag: str, sentences: int) -> str:
    body = " ".join(_sentence(rng, 8) for _ in range(sentences))
    return f"Request {tag.replace('-', ' dash ')}. {body}"


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "not-json"


def run_one(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> Outcome:
    """Send one request of a kind drawn from KINDS; never raises for what the server does."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    start = time.monotonic()
    try:
        status, code, size, expected = _KIND_RUNNERS[kind](client, url, rng, tag, check_hit)
    except httpx.HTTPError as error:
        return Outcome(kind, 0, type(error).__name__, time.monotonic() - start, False)
    return Outcome(kind, status, code, time.monotonic() - start, expected, size)


def _audio_outcome(response: httpx.Response) -> tuple[int, str, int, bool]:
    if response.status_code == 200:
        size = len(response.content)
        return 200, response.headers.get("X-Cache", ""), size, size > 0
    busy = response.status_code == 503 and _error_code(response) == "busy"
    return response.status_code, _error_code(response), 0, busy


def _hit(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> tuple[int, str, int, bool]:
    phrase, audio_format = rng.choice(PHRASES), rng.choice(["wav", "mp3"])
    body = {"model": "tts-1", "input": phrase, "response_format": audio_format}
    response = client.post(f"{url}/v1/audio/speech", json=body)
    status, code, size, expected = _audio_outcome(response)
    if status == 200 and not check_hit(f"{audio_format}:{phrase}", response.content):
        return status, "bytes-differ", size, False
    return status, code, size, expected


def _miss(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> tuple[int, str, int, bool]:
    body = {
        "model": "tts-1",
        "input": _unique(rng, tag, 1),
        "response_format": rng.choice(FORMATS),
        "speed": rng.choice([0.8, 1.0, 1.25]),
    }
    return _audio_outcome(client.post(f"{url}/v1/audio/speech", json=body))


def _stream(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> tuple[int, str, int, bool]:
    form = {"text": _unique(rng, tag, 4), "format": "pcm_f32le"}
    with client.stream("POST", f"{url}/synthesize", data=form) as response:
        if response.status_code != 200:
            response.read()
            return _audio_outcome(response)
        size = sum(len(chunk) for chunk in response.iter_raw())
    return 200, response.headers.get("X-Cache", ""), size, size > 0


def _disconnect(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> tuple[int, str, int, bool]:
    body = {"model": "tts-1", "input": _unique(rng, tag, 6), "response_format": "pcm"}
    with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        if response.status_code != 200:
            response.read()
            return _audio_outcome(response)
        first = next(response.iter_raw(), b"")
    return 200, "hung-up", len(first), len(first) > 0


def _bad(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> tuple[int, str, int, bool]:
    name, body = rng.choice(BAD_BODIES)
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        response = client.post(f"{url}/v1/audio/speech", content=body, headers=headers)
    else:
        response = client.post(f"{url}/v1/audio/speech", json=body)
    code = f"{name}:{_error_code(response)}"
    return response.status_code, code, 0, _is_client_error(response.status_code)


def _is_client_error(status: int) -> bool:
    """A 4xx for bad input; 429 would mean the soak itself tripped the rate limit."""
    return 400 <= status < 500 and status != 429


def _info(
    client: httpx.Client, url: str, rng: random.Random, tag: str, check_hit: HitCheck
) -> tuple[int, str, int, bool]:
    response = client.get(f"{url}{rng.choice(['/v1/models', '/v1/voices'])}")
    return response.status_code, "", len(response.content), response.status_code == 200


_KIND_RUNNERS = {
    "hit": _hit,
    "miss": _miss,
    "stream": _stream,
    "disconnect": _disconnect,
    "bad": _bad,
    "info": _info,
}
