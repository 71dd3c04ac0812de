"""OpenAI-compatible routes: POST /v1/audio/speech and GET /v1/models."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contract.errors import ErrorCode, ServiceError
from gateway.middleware import request_id_of
from gateway.parsing import audio_format, parse_model, require_content_type
from gateway.responses import audio_response, sse_response
from gateway.service import SpeechInput, cache_mode
from gateway.state import gateway_state

router = APIRouter()


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


@router.post("/v1/audio/speech", response_model=None)
async def create_speech(request: Request) -> Response:
    """Speech for `input`, streamed in `response_format` (or as SSE events)."""
    require_content_type(request, "application/json")
    body = parse_model(SpeechBody, await request.body())
    state = gateway_state(request)
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
        cache_mode=cache_mode(request.headers.get("cache-control")),
    )
    job = await state.speech.prepare(given, request_id_of(request.scope))
    result = await state.speech.serve(job)
    if body.stream_format == "sse":
        return sse_response(result, input_chars=len(job.synthesis.text))
    return audio_response(result)


@router.get("/v1/models")
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
