"""Registered voices in Redis, and the resolution of a request's `voice` to what a worker needs.

Storage: one hash `voice:{id}` per registered voice, with no TTL (Redis runs volatile-lru, so
only cache keys are ever evicted), plus the set `voices` indexing the ids. Fields: `name`,
`engine`, `model_version`, `prompt_text`, `prompt_sha256`, `created_at`, and `features`: the
engine's prompt features, computed once by a worker at registration. The recording itself is
not kept.

Resolving and listing read the small fields only; the features (160-480 kB for a 10-30 s
prompt) are read when a synthesis is actually sent to a worker, so a cache hit on a registered
voice costs one small Redis read.
"""

from __future__ import annotations

import asyncio
import bisect
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import RedisError

from contract.errors import ErrorCode, ServiceError
from gateway.redis_client import RedisClient
from gateway.settings import OPENAI_VOICE_NAMES
from gateway.workers import EngineInfo

VOICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VOICE_KEY_PREFIX = "voice:"
VOICE_INDEX_KEY = "voices"
FEATURES_FIELD = "features"
_META_FIELDS = ("name", "engine", "model_version", "prompt_text", "prompt_sha256", "created_at")
T = TypeVar("T")


@dataclass(frozen=True)
class RegisteredVoice:
    """A registered voice's description; `features` is empty unless read with them."""

    id: str
    name: str
    engine: str
    model_version: str
    prompt_text: str | None
    prompt_sha256: str
    created_at: float
    features: bytes = b""

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "type": "registered",
            "engine": self.engine,
            "model_version": self.model_version,
            "prompt_text": self.prompt_text,
            "prompt_sha256": self.prompt_sha256,
            "created_at": int(self.created_at),
        }


@dataclass(frozen=True)
class ResolvedVoice:
    """What a request's `voice` means: a built-in id, or a registered voice (by id).

    `key_voice` is the voice id the cache key uses; `registered` is set for a registered
    voice, whose features the gateway sends along with `worker_voice`.
    """

    key_voice: str
    worker_voice: str | None
    registered: RegisteredVoice | None = None


class VoiceStore:
    def __init__(
        self, client: RedisClient, timeout_s: float, *, key_prefix: str = VOICE_KEY_PREFIX
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        # Hash-tagged in a Redis Cluster (gateway.redis_client.voice_key_prefix).
        self._prefix = key_prefix

    async def save(self, voice: RegisteredVoice) -> None:
        """Store (or replace) a voice and its features, with no TTL."""
        if not voice.features:
            raise ValueError("a registered voice is stored with its features")
        mapping: dict[str, bytes | str | float] = {
            "name": voice.name,
            "engine": voice.engine,
            "model_version": voice.model_version,
            "prompt_text": voice.prompt_text or "",
            "prompt_sha256": voice.prompt_sha256,
            "created_at": voice.created_at,
            FEATURES_FIELD: voice.features,
        }

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._prefix + voice.id)
                pipe.hset(self._prefix + voice.id, mapping=mapping)  # type: ignore[arg-type]
                pipe.sadd(VOICE_INDEX_KEY, voice.id)
                await pipe.execute()

        await self._bounded(write())

    async def get(self, voice_id: str) -> RegisteredVoice | None:
        """The voice's description, without its features; None when there is no such voice."""
        if not VOICE_ID_PATTERN.match(voice_id):
            return None
        values = await self._bounded(
            self._client.hmget(self._prefix + voice_id, list(_META_FIELDS))
        )
        if all(value is None for value in values):
            return None
        return _from_hash(voice_id, _fields(values))

    async def features(self, voice_id: str) -> bytes | None:
        """The voice's stored features; None when the voice is gone or has none."""
        if not VOICE_ID_PATTERN.match(voice_id):
            return None
        value = await self._bounded(self._client.hget(self._prefix + voice_id, FEATURES_FIELD))
        return _bytes(value) if value else None

    async def page(self, after: str | None, limit: int) -> tuple[list[RegisteredVoice], bool]:
        """Up to `limit` registered voices, by id, whose ids sort after `after`; and whether
        more follow. Two Redis calls whatever the number of voices: the index, then one
        pipeline for the page's descriptions (never one round trip per voice)."""
        members = await self._bounded(self._client.smembers(VOICE_INDEX_KEY))
        ids = sorted(_bytes(member).decode() for member in members)
        start = bisect.bisect_right(ids, after) if after is not None else 0
        chosen = ids[start : start + limit]

        async def read() -> list[list[bytes | str | None]]:
            async with self._client.pipeline(transaction=False) as pipe:
                for voice_id in chosen:
                    pipe.hmget(self._prefix + voice_id, list(_META_FIELDS))
                rows: list[list[bytes | str | None]] = await pipe.execute()
                return rows

        rows = await self._bounded(read()) if chosen else []
        voices = [
            _from_hash(voice_id, _fields(values))
            for voice_id, values in zip(chosen, rows, strict=True)
            if any(value is not None for value in values)  # deleted since the index was read
        ]
        return voices, start + limit < len(ids)

    async def count(self) -> int:
        """How many voices are registered."""
        return int(await self._bounded(self._client.scard(VOICE_INDEX_KEY)))

    async def list(self) -> list[RegisteredVoice]:
        ids = await self._bounded(self._client.smembers(VOICE_INDEX_KEY))
        voices = []
        for raw_id in sorted(ids):
            voice = await self.get(_bytes(raw_id).decode())
            if voice is not None:
                voices.append(voice)
        return voices

    async def delete(self, voice_id: str) -> bool:
        async def remove() -> int:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._prefix + voice_id)
                pipe.srem(VOICE_INDEX_KEY, voice_id)
                deleted, _ = await pipe.execute()
                return int(deleted)

        return await self._bounded(remove()) > 0

    async def _bounded(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except (RedisError, OSError, TimeoutError) as error:
            raise ServiceError(
                ErrorCode.NOT_READY,
                "Voice storage is unavailable; retry shortly.",
                headers={"Retry-After": "1"},
            ) from error


async def resolve_voice(
    requested: str | None,
    info: EngineInfo,
    store: VoiceStore,
    openai_voices: dict[str, str],
) -> ResolvedVoice:
    """Map a request's voice to the engine: built-in id, OpenAI name, or registered voice.

    An OpenAI name maps through `openai_voices`, else to the engine's default voice. An
    unknown id is 422 `unknown_voice`; a registered voice whose features were computed by
    another engine or model version than the workers' is 422 `voice_outdated` (register the
    recording again).
    """
    if not requested:
        return ResolvedVoice(key_voice=info.default_voice, worker_voice=info.default_voice)
    if info.has_voice(requested):
        return ResolvedVoice(key_voice=requested, worker_voice=requested)
    if requested in OPENAI_VOICE_NAMES:
        target = openai_voices.get(requested, info.default_voice)
        if info.has_voice(target) or target == info.default_voice:
            return ResolvedVoice(key_voice=target, worker_voice=target)
        requested = target
    registered = await store.get(requested)
    if registered is None:
        raise ServiceError(
            ErrorCode.UNKNOWN_VOICE, f"Unknown voice {requested!r}; see GET /v1/voices."
        )
    check_current(registered, info)
    return ResolvedVoice(key_voice=registered.id, worker_voice=registered.id, registered=registered)


def check_current(voice: RegisteredVoice, info: EngineInfo) -> None:
    """422 `voice_outdated` unless the voice's features fit the workers' engine and model."""
    if voice.engine != info.engine or voice.model_version != info.model_version:
        raise ServiceError(
            ErrorCode.VOICE_OUTDATED,
            f"Voice {voice.id!r} was registered with {voice.engine} model version "
            f"{voice.model_version!r}; the service now runs {info.engine} model version "
            f"{info.model_version!r}. Register the recording again.",
        )


def _fields(values: list[bytes | str | None]) -> dict[bytes, bytes]:
    """An HMGET of `_META_FIELDS` as the field mapping `_from_hash` reads."""
    return {
        name.encode(): _bytes(value)
        for name, value in zip(_META_FIELDS, values, strict=True)
        if value is not None
    }


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _from_hash(voice_id: str, fields: dict[bytes, bytes]) -> RegisteredVoice:
    return RegisteredVoice(
        id=voice_id,
        name=fields.get(b"name", b"").decode(),
        engine=fields.get(b"engine", b"").decode(),
        model_version=fields.get(b"model_version", b"").decode(),
        prompt_text=fields.get(b"prompt_text", b"").decode() or None,
        prompt_sha256=fields.get(b"prompt_sha256", b"").decode(),
        created_at=float(fields.get(b"created_at", b"0")),
        features=fields.get(FEATURES_FIELD.encode(), b""),
    )
