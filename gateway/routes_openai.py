"""OpenAI-compatible routes: POST /v1/audio/speech and GET /v1/models."""

from __future__ import annotations

from typing import Literal

from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contract.errors import ErrorCode, ServiceError
from gateway.middleware import request_id_of
from gateway.openapi import audio_response as audio_doc
from gateway.openapi import errors, request_body
from gateway.parsing import audio_format, parse_model, require_content_type
from gateway.responses import audio_response, sse_response
from gateway.schemas import ALL_FORMATS, ModelList, ModelObject
from gateway.service import SpeechInput, SpeechJob, cache_mode
from gateway.state import GatewayState, gateway_state

CACHE_CHECKED_SCOPE_KEY = "gateway.cache_checked"
"""Set by gateway.fast_path when it asked Redis for this request and missed."""


class VoiceRef(BaseModel):
    """OpenAI's custom-voice object, `{"id": "..."}`."""

    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechBody(BaseModel):
    """The body of OpenAI's `audio.speech.create`.

    Constraints the service reports with its own error codes (format, speed, text) are
    documented in the schema but checked after parsing, where those codes are raised.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="A configured model name (GATEWAY_MODEL_NAMES) or the engine's model.",
        examples=["tts-1"],
    )
    input: str = Field(
        description="Text to speak (NFC-normalized, trimmed).", json_schema_extra={"minLength": 1}
    )
    voice: str | VoiceRef | None = Field(
        default=None,
        description="A built-in voice, an OpenAI voice name or a registered voice id.",
        examples=["alloy"],
    )
    response_format: str = Field(
        default="mp3",
        description="OpenAI's formats, plus this service's raw float32 `pcm_f32le`.",
        json_schema_extra={"enum": list(ALL_FORMATS)},
    )
    speed: float = Field(default=1.0, json_schema_extra={"minimum": 0.25, "maximum": 4.0})
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    prompt_text: str | None = Field(
        default=None,
        description=(
            "Not usable here: this body carries no prompt recording, so a transcript is "
            "refused with 422 `prompt_text_without_audio` (clone with POST /synthesize or "
            "a registered voice)."
        ),
    )


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
        prompt_text=body.prompt_text,
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
    names = dict.fromkeys([*state.settings.model_names, info.model])
    models = ModelList(data=[ModelObject(id=name, capabilities=info) for name in names])
    return JSONResponse(models.model_dump(mode="json"))


BODY_MODELS: tuple[type[BaseModel], ...] = (SpeechBody,)

ROUTES = [
    APIRoute(
        "/v1/audio/speech",
        create_speech,
        methods=["POST"],
        summary="Synthesize speech (OpenAI-compatible)",
        response_class=Response,
        responses={
            **audio_doc("The audio, streamed as it is made (or SSE events).", sse=True),
            **errors(400, 401, 413, 415, 422, 429, 502, 503, 504),
        },
        openapi_extra=request_body({"application/json": SpeechBody}),
    ),
    APIRoute(
        "/v1/models",
        list_models,
        methods=["GET"],
        summary="Models and the engine behind them",
        response_model=ModelList,
        responses=errors(401, 429, 502, 503),
    ),
]
