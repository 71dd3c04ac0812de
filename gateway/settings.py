"""Gateway settings, read from `GATEWAY_*` environment variables; a misspelt name fails loudly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contract.prompt import PROMPT_MAX_S, PROMPT_MIN_S
from contract.requests import DEFAULT_MAX_TEXT_CHARS

OPENAI_VOICE_NAMES: tuple[str, ...] = (
    "alloy",
    "ash",
    "ballad",
    "cedar",
    "coral",
    "echo",
    "fable",
    "marin",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
)


def _csv_items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _split_csv(value: object) -> object:
    return _csv_items(value) if isinstance(value, str) else value


def _parse_mapping(value: object) -> object:
    """`alloy=joe,echo=amy` -> {"alloy": "joe", "echo": "amy"}; a dict passes through."""
    if not isinstance(value, str):
        return value
    mapping: dict[str, str] = {}
    for pair in _csv_items(value):
        name, sep, target = pair.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"expected name=voice pairs, got {pair!r}")
        mapping[name.strip()] = target.strip()
    return mapping


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    # Address Hypercorn binds.
    host: str = "127.0.0.1"
    # Port Hypercorn binds.
    port: int = Field(default=8000, ge=0, le=65535)
    # Redis holding the audio cache (keys with a TTL) and registered voices (no TTL).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # GATEWAY_REDIS_URL is one node of a Redis Cluster: keys are spread over its nodes by slot.
    redis_cluster: bool = False
    # Redis Sentinels (`host:port,host:port`): the gateway asks them where the master is and
    # follows failovers; GATEWAY_REDIS_URL then gives only the db number and the password.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Name of the master the sentinels watch.
    redis_sentinel_master: str = "tts"
    # Base URL of one worker, or of nginx's internal listener that balances the workers.
    worker_url: str = "http://127.0.0.1:8001"
    # Comma-separated Bearer API keys; empty turns authentication off.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Lifetime of a cache entry in seconds (default 7 days); every cache key gets it.
    cache_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    # Largest response stored in the cache, in bytes; larger ones are served but not stored.
    cache_max_entry_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Most time one Redis call may take before the request goes on uncached, in seconds.
    cache_budget_s: float = Field(default=0.1, gt=0)
    # After a Redis failure, how long the cache is skipped before Redis is tried again, in seconds.
    cache_retry_after_s: float = Field(default=1.0, ge=0)
    # Entries larger than this are stored and read in pieces of this many bytes.
    cache_piece_bytes: int = Field(default=256 * 1024, gt=0)
    # Longest wait for one piece of a large hit before that response is aborted, in seconds.
    cache_piece_timeout_s: float = Field(default=5.0, gt=0)
    # Audio bytes the gateway may hold (miss bodies and hit pieces); above it, 503 busy.
    max_held_audio_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Time to open a connection to a worker, in seconds.
    upstream_connect_timeout_s: float = Field(default=2.0, gt=0)
    # Longest silence between two chunks of a worker's stream, in seconds.
    upstream_read_timeout_s: float = Field(default=60.0, gt=0)
    # Pooled keep-alive connections to the workers.
    upstream_max_connections: int = Field(default=256, gt=0)
    # How many times a worker's 503 "busy" is retried before it is passed to the client.
    upstream_busy_retries: int = Field(default=3, ge=0)
    # First back-off after a "busy" answer, in seconds; it doubles on each retry.
    upstream_busy_backoff_s: float = Field(default=0.05, ge=0)
    # Longest a request spends on refusals (workers' queue waits and back-offs) before the
    # client gets 503 busy, in seconds; never past the request deadline.
    upstream_retry_budget_s: float = Field(default=2.0, gt=0)
    # Whole-request deadline from arrival to the last audio byte, in seconds.
    request_deadline_s: float = Field(default=300.0, gt=0)
    # On SIGTERM: how long responses in progress may go on before they are cut, in seconds (no
    # new connection is accepted meanwhile); Kubernetes sets it to the request deadline.
    shutdown_grace_s: float = Field(default=5.0, gt=0)
    # How often the workers' GET /v1/info and /readyz are polled, in seconds.
    info_refresh_s: float = Field(default=5.0, gt=0)
    # Longest input text, in characters after normalization.
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, gt=0)
    # Largest prompt recording upload, in bytes.
    prompt_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Shortest prompt recording, in seconds (workers apply the contract's own, PROMPT_MIN_S).
    prompt_min_s: float = Field(default=PROMPT_MIN_S, ge=0)
    # Longest prompt recording, in seconds (workers apply the contract's own, PROMPT_MAX_S).
    prompt_max_s: float = Field(default=PROMPT_MAX_S, gt=0)
    # Most items in one POST /synthesize_batch.
    batch_max_items: int = Field(default=32, gt=0)
    # Items of one batch synthesized at once; keep it within what the workers admit together.
    batch_concurrency: int = Field(default=4, gt=0)
    # OpenAI voice names mapped to engine voice ids (`alloy=joe,echo=amy`); unmapped OpenAI
    # names fall back to the engine's default voice.
    openai_voices: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # Model names POST /v1/audio/speech accepts; all are served by the workers' engine.
    model_names: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "cosyvoice2",
                                 "cosyvoice3", "piper"]
    )
    # Log records as JSON lines instead of plain text.
    log_json: bool = False
    # Root log level.
    log_level: str = "WARNING"
    # One INFO line per synthesis request (id, cache outcome, key, voice, format, text).
    log_requests: bool = False
    # Privacy: request lines carry the text's length and a short hash, never the text.
    log_redact_text: bool = False

    @field_validator("api_keys", "model_names", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinels(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _one_redis_topology(self) -> GatewaySettings:
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError("GATEWAY_REDIS_CLUSTER and GATEWAY_REDIS_SENTINELS exclude each other")
        return self

    @field_validator("openai_voices", mode="before")
    @classmethod
    def _mapping(cls, value: object) -> object:
        return _parse_mapping(value)

    @field_validator("openai_voices")
    @classmethod
    def _known_openai_names(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(OPENAI_VOICE_NAMES))
        if unknown:
            raise ValueError(f"not OpenAI voice names: {', '.join(unknown)}")
        return value


def load_settings(environ: Mapping[str, str] | None = None) -> GatewaySettings:
    """Settings from the environment; an unknown `GATEWAY_*` variable is an error, not ignored."""
    env = os.environ if environ is None else environ
    prefix = "GATEWAY_"
    known = {prefix + name.upper() for name in GatewaySettings.model_fields}
    unknown = sorted(
        key for key in env if key.upper().startswith(prefix) and key.upper() not in known
    )
    if unknown:
        raise ValueError(f"unknown gateway settings: {', '.join(unknown)}")
    return GatewaySettings()
