"""The voices API: list built-in and registered voices, register one from a prompt, delete it.

Registration validates the prompt like /synthesize does and is refused (422
`prompt_unsupported`) by engines that cannot clone. For engines that can, the voice is stored
in Redis (see gateway.voices); computing its prompt features once, on a worker, belongs in
`_register` when workers offer that endpoint.
"""

from __future__ import annotations

import hashlib
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contract.errors import ErrorCode, ServiceError
from gateway.parsing import require_content_type
from gateway.routes_synthesize import FORM_TYPES, prompt_limits, read_prompt
from gateway.settings import OPENAI_VOICE_NAMES
from gateway.state import GatewayState, gateway_state
from gateway.voices import VOICE_ID_PATTERN, RegisteredVoice
from gateway.workers import BuiltinVoice, EngineInfo


def _builtin(voice: BuiltinVoice, info: EngineInfo) -> dict[str, object]:
    return {
        "id": voice.id,
        "name": voice.name,
        "type": "builtin",
        "engine": info.engine,
        "language": voice.language,
        "description": voice.description,
        "default": voice.id == info.default_voice,
    }


async def list_voices(request: Request) -> JSONResponse:
    """Built-in voices of the engine, registered voices, and where OpenAI's names point."""
    state = gateway_state(request)
    info = await state.directory.current()
    registered = await state.voices.list()
    aliases = {
        name: state.settings.openai_voices.get(name, info.default_voice)
        for name in OPENAI_VOICE_NAMES
    }
    data = [_builtin(voice, info) for voice in info.voices]
    data += [voice.public() for voice in registered]
    return JSONResponse({"object": "list", "data": data, "openai_aliases": aliases})


async def get_voice(request: Request) -> JSONResponse:
    voice_id = str(request.path_params["voice_id"])
    state = gateway_state(request)
    info = await state.directory.current()
    for voice in info.voices:
        if voice.id == voice_id:
            return JSONResponse(_builtin(voice, info))
    registered = await state.voices.get(voice_id)
    if registered is None:
        raise ServiceError(ErrorCode.VOICE_NOT_FOUND, f"No voice {voice_id!r}.")
    return JSONResponse(registered.public())


async def register_voice(request: Request) -> JSONResponse:
    """Multipart `prompt_audio` (file), `prompt_text`, optional `name` and `id`; 201 + voice."""
    require_content_type(request, *FORM_TYPES)
    state = gateway_state(request)
    form = await request.form(max_files=1, max_fields=8)
    try:
        prompt = await read_prompt(form.get("prompt_audio"), prompt_limits(state.settings))
        fields = {name: form.get(name) for name in ("id", "name", "prompt_text")}
    finally:
        await form.close()
    if prompt is None:
        raise ServiceError(ErrorCode.INVALID_REQUEST, "prompt_audio: a recording is required")
    texts = {name: value if isinstance(value, str) else None for name, value in fields.items()}
    voice = await _register(state, prompt.data, texts)
    return JSONResponse(voice.public(), status_code=201)


async def _register(
    state: GatewayState, prompt_audio: bytes, fields: dict[str, str | None]
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
    voice = RegisteredVoice(
        id=voice_id,
        name=fields.get("name") or voice_id,
        engine=info.engine,
        model_version=info.model_version,
        prompt_audio=prompt_audio,
        prompt_text=(fields.get("prompt_text") or "").strip() or None,
        prompt_sha256=hashlib.sha256(prompt_audio).hexdigest(),
        created_at=time.time(),
        features=None,  # to be filled by a worker's feature extraction once it exists
    )
    await state.voices.save(voice)
    return voice


async def delete_voice(request: Request) -> Response:
    voice_id = str(request.path_params["voice_id"])
    state = gateway_state(request)
    info = await state.directory.current()
    if info.has_voice(voice_id):
        raise ServiceError(ErrorCode.FORBIDDEN, f"{voice_id!r} is built into the engine.")
    if not await state.voices.delete(voice_id):
        raise ServiceError(ErrorCode.VOICE_NOT_FOUND, f"No voice {voice_id!r}.")
    return Response(status_code=204)


ROUTES = [
    Route("/v1/voices", list_voices, methods=["GET"]),
    Route("/v1/voices/{voice_id}", get_voice, methods=["GET"]),
    Route("/v1/voices", register_voice, methods=["POST"]),
    Route("/v1/voices/{voice_id}", delete_voice, methods=["DELETE"]),
]
