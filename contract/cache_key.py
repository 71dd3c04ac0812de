"""The audio cache key: `tts:v1:` + MD5 over a canonical serialization of the request.

Everything that changes the returned bytes is in it, so one voice's audio is never handed to a
request for another; a new model version changes every key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from contract.requests import normalize_text

CACHE_KEY_PREFIX = "tts:v1:"


@dataclass(frozen=True)
class CanonicalRequest:
    text: str
    instruction: str | None
    voice: str | None
    prompt_audio_sha256: str | None
    prompt_text: str | None
    speed: float
    format: str
    engine: str
    model_version: str

    @classmethod
    def build(
        cls,
        *,
        text: str,
        instruction: str | None,
        voice: str | None,
        prompt_audio: bytes | None,
        prompt_text: str | None,
        speed: float,
        format: str,
        engine: str,
        model_version: str,
    ) -> CanonicalRequest:
        return cls(
            text=normalize_text(text),
            instruction=_optional_text(instruction),
            voice=voice or None,
            prompt_audio_sha256=hashlib.sha256(prompt_audio).hexdigest() if prompt_audio else None,
            prompt_text=_optional_text(prompt_text),
            speed=round(float(speed), 4),
            format=format,
            engine=engine,
            model_version=model_version,
        )

    def serialize(self) -> bytes:
        # Every field is a flat scalar, so a plain dict equals `asdict` without its deep copy.
        flat = {field.name: getattr(self, field.name) for field in fields(self)}
        return json.dumps(flat, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def digest(self) -> str:
        return hashlib.md5(self.serialize(), usedforsecurity=False).hexdigest()

    def cache_key(self) -> str:
        return CACHE_KEY_PREFIX + self.digest()


def _optional_text(value: str | None) -> str | None:
    if value is None:
        return None
    normalized = normalize_text(value)
    return normalized or None
