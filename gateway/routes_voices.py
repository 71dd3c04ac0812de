"""The voices API: list built-in and registered voices, register one from a prompt, delete it.

Registration validates the prompt like /synthesize does and is refused (422
`prompt_unsupported`) by engines that cannot clone, before any worker is contacted. For engines
that can, one worker computes the prompt's features once (`POST /v1/voices/features`); they are
stored in Redis with the voice (see gateway.voices) and sent with every synthesis that names
the voice, so no request recomputes them.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Annotated

from fastapi import Path, Query
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contract.errors import ErrorCode, ServiceError
from contract.requests import VoiceFeaturesRequest
from gateway.middleware import request_id_of
from gateway.openapi import errors, request_body
from gateway.parsing import read_form, require_content_type
from gateway.routes_synthesize import FORM_TYPES, prompt_limits, read_prompt
from gateway.schemas import BuiltinVoiceOut, RegisteredVoiceOut, VoiceForm, VoiceList
from gateway.settings import OPENAI_VOICE_NAMES
from gateway.state import GatewayState, gateway_state
from gateway.voices import VOICE_ID_PATTERN, RegisteredVoice
from gateway.workers import BuiltinVoice, EngineInfo

VoiceId = Annotated[str, Path(description="A built-in or registered voice id.")]
DEFAULT_PAGE = 100
MAX_PAGE = 500


def _builtin(voice: BuiltinVoice, info: EngineInfo) -> BuiltinVoiceOut:
    return BuiltinVoiceOut(
        id=voice.id,
        name=voice.name,
        engine=info.engine,
        language=voice.language,
        description=voice.description,
        default=voice.id == info.default_voice,
    )


def _registered(voice: RegisteredVoice) -> RegisteredVoiceOut:
    return RegisteredVoiceOut.model_validate(voice.public())


async def list_voices(
    request: Request,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE, description="Voices on this page (built-in ones first).")
    ] = DEFAULT_PAGE,
    after: Annotated[
        str | None,
        Query(max_length=128, description="The `last_id` of the previous page."),
    ] = None,
) -> JSONResponse:
    """Built-in voices of the engine, then registered voices by id, a page at a time, and
    where OpenAI's names point. `has_more` says whether a next page exists; ask for it with
    `after=<last_id>`. A page costs two Redis calls however many voices are registered."""
    state = gateway_state(request)
    info = await state.directory.current()
    builtin_ids = [voice.id for voice in info.voices]
    start = builtin_ids.index(after) + 1 if after in builtin_ids else 0
    if after is not None and after not in builtin_ids:
        start = len(builtin_ids)  # the cursor is a registered voice: built-ins are done
    data: list[BuiltinVoiceOut | RegisteredVoiceOut] = [
        _builtin(voice, info) for voice in info.voices[start : start + limit]
    ]
    room = limit - len(data)
    registered_after = after if after is not None and after not in builtin_ids else None
    if room > 0:
        registered, has_more = await state.voices.page(registered_after, room)
        data += [_registered(voice) for voice in registered]
    else:
        has_more = start + limit < len(builtin_ids) or await state.voices.count() > 0
    aliases = {
        name: state.settings.openai_voices.get(name, info.default_voice)
        for name in OPENAI_VOICE_NAMES
    }
    voices = VoiceList(
        data=data,
        openai_aliases=aliases,
        has_more=has_more,
        last_id=data[-1].id if data else None,
    )
    return JSONResponse(voices.model_dump(mode="json"))


async def get_voice(request: Request, voice_id: VoiceId) -> JSONResponse:
    state = gateway_state(request)
    info = await state.directory.current()
    for voice in info.voices:
        if voice.id == voice_id:
            return JSONResponse(_builtin(voice, info).model_dump(mode="json"))
    registered = await state.voices.get(voice_id)
    if registered is None:
        raise ServiceError(ErrorCode.VOICE_NOT_FOUND, f"No voice {voice_id!r}.")
    return JSONResponse(_registered(registered).model_dump(mode="json"))


async def register_voice(request: Request) -> JSONResponse:
    """Multipart `prompt_audio` (file), `prompt_text`, optional `name` and `id`; 201 + voice."""
    require_content_type(request, *FORM_TYPES)
    state = gateway_state(request)
    form = await read_form(request, max_files=1, max_fields=8)
    try:
        prompt = await read_prompt(form.get("prompt_audio"), prompt_limits(state.settings))
        fields = {name: form.get(name) for name in ("id", "name", "prompt_text")}
    finally:
        await form.close()
    if prompt is None:
        raise ServiceError(ErrorCode.INVALID_REQUEST, "prompt_audio: a recording is required")
    texts = {name: value if isinstance(value, str) else None for name, value in fields.items()}
    voice = await _register(state, prompt.data, texts, request_id_of(request.scope))
    return JSONResponse(_registered(voice).model_dump(mode="json"), status_code=201)


async def _register(
    state: GatewayState, prompt_audio: bytes, fields: dict[str, str | None], request_id: str
) -> RegisteredVoice:
    info = await state.directory.current()
    if not info.supports_cloning:
        raise ServiceError(
            ErrorCode.PROMPT_UNSUPPORTED,
            f"Engine {info.engine!r} cannot clone voices; use one of its built-in voices.",
        )
    voice_id = fields.get("id") or f"voice_{uuid.uuid4().hex[:16]}"
    if not VOICE_ID_PATTERN.match(voice_id):
        raise ServiceError(ErrorCode.INVALID_REQUEST, "id: must match ^[A-Za-z0-9_-]{1,64}$")
    if info.has_voice(voice_id) or voice_id in OPENAI_VOICE_NAMES:
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"id: {voice_id!r} names a built-in voice")
    prompt_text = (fields.get("prompt_text") or "").strip() or None
    # Base64Bytes validates base64 text into bytes: hand it the encoded upload.
    computed = await state.speech.voice_features(
        VoiceFeaturesRequest(
            prompt_audio=base64.b64encode(prompt_audio), prompt_text=prompt_text
        ),
        request_id,
    )
    if not computed.data:
        raise ServiceError(ErrorCode.UPSTREAM_ERROR, "The worker returned no voice features.")
    voice = RegisteredVoice(
        id=voice_id,
        name=fields.get("name") or voice_id,
        engine=computed.engine or info.engine,
        model_version=computed.model_version or info.model_version,
        prompt_text=prompt_text,
        prompt_sha256=hashlib.sha256(prompt_audio).hexdigest(),
        created_at=time.time(),
        features=computed.data,
    )
    await state.voices.save(voice)
    return voice


async def delete_voice(request: Request, voice_id: VoiceId) -> Response:
    state = gateway_state(request)
    info = await state.directory.current()
    if info.has_voice(voice_id):
        raise ServiceError(ErrorCode.FORBIDDEN, f"{voice_id!r} is built into the engine.")
    if not await state.voices.delete(voice_id):
        raise ServiceError(ErrorCode.VOICE_NOT_FOUND, f"No voice {voice_id!r}.")
    return Response(status_code=204)


BODY_MODELS: tuple[type[BaseModel], ...] = (VoiceForm,)

ROUTES = [
    APIRoute(
        "/v1/voices",
        list_voices,
        methods=["GET"],
        summary="Built-in and registered voices, a page at a time",
        response_model=VoiceList,
        responses=errors(401, 422, 429, 502, 503),
    ),
    APIRoute(
        "/v1/voices/{voice_id}",
        get_voice,
        methods=["GET"],
        summary="One voice",
        response_model=BuiltinVoiceOut | RegisteredVoiceOut,
        responses=errors(401, 404, 422, 429, 502, 503),
    ),
    APIRoute(
        "/v1/voices",
        register_voice,
        methods=["POST"],
        summary="Register a voice from a prompt recording",
        description=(
            "A worker computes the recording's prompt features once; they are stored with the "
            "voice (no expiry) and used by every request that names its id. Engines that cannot "
            "clone answer 422 `prompt_unsupported`."
        ),
        status_code=201,
        response_model=RegisteredVoiceOut,
        responses=errors(401, 413, 415, 422, 429, 502, 503, 504),
        openapi_extra=request_body({"multipart/form-data": VoiceForm}),
    ),
    APIRoute(
        "/v1/voices/{voice_id}",
        delete_voice,
        methods=["DELETE"],
        summary="Delete a registered voice",
        status_code=204,
        response_class=Response,
        responses=errors(401, 403, 404, 422, 429, 502, 503),
    ),
]
