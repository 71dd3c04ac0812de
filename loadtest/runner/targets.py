"""Targets: where requests go, which API they speak, and what text and cache policy they use.

A target is written on the command line as comma-separated `key=value` pairs, for example
`label=nginx,url=http://127.0.0.1:8080,api=openai,texts=repeat`. Only `url` is required.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from loadtest.runner.texts import TextMode


class Api(StrEnum):
    OPENAI = "openai"  # gateway: POST /v1/audio/speech, JSON
    SEED = "seed"  # gateway: POST /synthesize, multipart form
    WORKER = "worker"  # a worker directly: POST /v1/synthesize, JSON


class CachePolicy(StrEnum):
    USE = "use"
    BYPASS = "bypass"  # sends Cache-Control: no-cache


PATHS: dict[Api, str] = {
    Api.OPENAI: "/v1/audio/speech",
    Api.SEED: "/synthesize",
    Api.WORKER: "/v1/synthesize",
}

DEFAULT_FORMATS: dict[Api, str] = {
    Api.OPENAI: "pcm",
    Api.SEED: "pcm_f32le",
    Api.WORKER: "pcm_f32le",
}

FORMATS: dict[Api, frozenset[str]] = {
    Api.OPENAI: frozenset({"pcm", "wav", "flac", "mp3", "opus"}),
    Api.SEED: frozenset({"pcm_f32le", "pcm", "wav", "flac", "mp3", "opus"}),
    Api.WORKER: frozenset({"pcm_f32le", "pcm", "wav", "flac", "mp3", "opus"}),
}

E = TypeVar("E", bound=StrEnum)

TARGET_KEYS = ("label", "url", "api", "texts", "cache", "format", "voice", "model")


class TargetSpecError(ValueError):
    """A target spec that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    api: Api = Api.OPENAI
    texts: TextMode = TextMode.MIX
    cache: CachePolicy = CachePolicy.USE
    format: str = "pcm"
    voice: str | None = None
    model: str = "tts-1"

    @property
    def path(self) -> str:
        return PATHS[self.api]

    @property
    def ready_path(self) -> str:
        return "/readyz"

    def request_kwargs(self, text: str, api_key: str | None) -> dict[str, Any]:
        """Keyword arguments for `httpx.AsyncClient.stream("POST", ...)` for one text."""
        headers: dict[str, str] = {}
        if self.cache is CachePolicy.BYPASS:
            headers["Cache-Control"] = "no-cache"
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        url = self.url + self.path
        if self.api is Api.OPENAI:
            body: dict[str, Any] = {
                "model": self.model,
                "input": text,
                "voice": self.voice or "alloy",
                "response_format": self.format,
            }
            return {"url": url, "json": body, "headers": headers}
        if self.api is Api.SEED:
            form = {"text": text, "format": self.format}
            if self.voice:
                form["voice"] = self.voice
            # (None, value) parts are plain form fields, sent as multipart/form-data like the
            # seed service's clients do (a `data=` dict alone would be urlencoded).
            fields = {name: (None, value) for name, value in form.items()}
            return {"url": url, "files": fields, "headers": headers}
        worker_body: dict[str, Any] = {"text": text, "format": self.format}
        if self.voice:
            worker_body["voice"] = self.voice
        return {"url": url, "json": worker_body, "headers": headers}


def parse_target(spec: str, index: int) -> Target:
    """Parse one `key=value,...` spec; `index` (from 0) names targets that have no label."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise TargetSpecError(f"{part!r} is not key=value")
        if key not in TARGET_KEYS:
            raise TargetSpecError(f"unknown key {key!r} (known: {', '.join(TARGET_KEYS)})")
        if key in fields:
            raise TargetSpecError(f"key {key!r} given twice")
        fields[key] = value.strip()
    if "url" not in fields:
        raise TargetSpecError("url=... is required, e.g. url=http://127.0.0.1:8080")
    url = _check_url(fields["url"])
    api = _choice(Api, fields.get("api", Api.OPENAI.value), "api")
    fmt = fields.get("format", DEFAULT_FORMATS[api])
    if fmt not in FORMATS[api]:
        raise TargetSpecError(
            f"format {fmt!r} is not one of {', '.join(sorted(FORMATS[api]))} for api={api}"
        )
    return Target(
        label=fields.get("label", f"target{index + 1}"),
        url=url,
        api=api,
        texts=_choice(TextMode, fields.get("texts", TextMode.MIX.value), "texts"),
        cache=_choice(CachePolicy, fields.get("cache", CachePolicy.USE.value), "cache"),
        format=fmt,
        voice=fields.get("voice"),
        model=fields.get("model", "tts-1"),
    )


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetSpecError(f"url {url!r} must be http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TargetSpecError(f"url {url!r} must be a base URL with no path or query")
    try:
        _ = parts.port
    except ValueError as e:
        raise TargetSpecError(f"url {url!r} has a bad port") from e
    return f"{parts.scheme}://{parts.netloc}"


def _choice(enum: type[E], value: str, key: str) -> E:
    try:
        return enum(value.lower())
    except ValueError as e:
        known = ", ".join(member.value for member in enum)
        raise TargetSpecError(f"{key}={value!r} is not one of {known}") from e
