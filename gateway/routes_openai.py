"""OpenAI-compatible routes: POST /v1/audio/speech and GET /v1/models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contract.errors import ErrorCode, ServiceError
from gateway.middleware import request_id_of
from gateway.parsing import audio_format, parse_model, require_content_type
from gateway.responses import audio_response, sse_response
from gateway.service import SpeechInput, SpeechJob, cache_mode
from gateway.state import GatewayState, gateway_state

CACHE_CHECKED_SCOPE_KEY = "gateway.cache_checked"
"""Set by gateway.fast_path when it asked Redis for this request and missed."""


class VoiceRef(BaseModel):
    """OpenAI's custom-voice object, `{"id": "..."}`."""

    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechBody(BaseModel):
    """The body of OpenAI's `audio.speech.create`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: str | VoiceRef | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"


async def speech_job(
    state: GatewayState, raw: bytes, cache_control: str | None, request_id: str
) -> tuple[SpeechBody, SpeechJob]:
    """Parse and validate a speech request into a keyed job; raises the request's 4xx."""
    body = parse_model(SpeechBody, raw)
    info = await state.directory.current()
    if body.model not in state.settings.model_names and body.model != info.model:
        known = ", ".join([*state.settings.model_names, info.model])
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, f"Unknown model {body.model!r}; use one of {known}."
        )
    voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
    given = SpeechInput(
        text=body.input,
        format=audio_format(body.response_format),
        voice=voice,
        instruction=body.instructions,
        speed=body.speed,
        cache_mode=cache_mode(cache_control),
    )
    return body, await state.speech.prepare(given, request_id)


async def create_speech(request: Request) -> Response:
    """Speech for `input`, streamed in `response_format` (or as SSE events)."""
    require_content_type(request, "application/json")
    state = gateway_state(request)
    body, job = await speech_job(
        state,
        await request.body(),
        request.headers.get("cache-control"),
        request_id_of(request.scope),
    )
    result = await state.speech.serve(job, cache_checked=CACHE_CHECKED_SCOPE_KEY in request.scope)
    if body.stream_format == "sse":
        return sse_response(result, input_chars=len(job.synthesis.text))
    return audio_response(result)


async def list_models(request: Request) -> JSONResponse:
    """Every accepted model name, each with the engine and capabilities behind it."""
    state = gateway_state(request)
    info = await state.directory.current()
    capabilities: dict[str, Any] = {
        key: info.raw.get(key)
        for key in (
            "engine",
            "model",
            "model_version",
            "sample_rate",
            "modes",
            "languages",
            "default_voice",
            "supports_cloning",
            "supports_instructions",
            "speed_range",
        )
    }
    names = dict.fromkeys([*state.settings.model_names, info.model])
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "cosyvoice-serve",
            "capabilities": capabilities,
        }
        for name in names
    ]
    return JSONResponse({"object": "list", "data": data})


ROUTES = [
    Route("/v1/audio/speech", create_speech, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
