"""The seed service's calls: POST /synthesize (multipart, streams) and POST /synthesize_batch."""

from __future__ import annotations

import base64
import json
from functools import partial
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from contract.audio import AudioFormat
from contract.errors import STATUS_BY_CODE, ErrorCode, ServiceError, error_body
from gateway.batch import BatchAbandonedError, run_batch
from gateway.middleware import request_id_of
from gateway.openapi import audio_response as audio_doc
from gateway.openapi import errors, request_body
from gateway.parsing import audio_format, parse_model, read_form, require_content_type
from gateway.prompt import PromptAudio, PromptLimits, check_prompt
from gateway.responses import audio_response
from gateway.schemas import ALL_FORMATS, BatchResponse, SynthesizeForm, SynthesizeUrlencodedForm
from gateway.service import CacheMode, SpeechInput, SpeechService, cache_mode
from gateway.settings import GatewaySettings
from gateway.single_flight import FlightAbortedError
from gateway.state import gateway_state
from gateway.upstream import PassThroughError

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_FORM_OVERHEAD_BYTES = 64 * 1024
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer


async def synthesize(request: Request) -> Response:
    """Multipart form `text`, `instruction`, `voice`, `format` (default pcm_f32le), `speed`,
    optional `prompt_audio` file and `prompt_text`; streams the audio as it is made."""
    require_content_type(request, *FORM_TYPES)
    state = gateway_state(request)
    limits = prompt_limits(state.settings)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes + _FORM_OVERHEAD_BYTES:
        raise ServiceError(
            ErrorCode.PROMPT_TOO_LARGE,
            f"The upload has {declared} bytes; a prompt may have at most {limits.max_bytes}.",
        )
    form = await read_form(request, max_files=1, max_fields=16)
    try:
        given = await _form_input(form, limits, cache_mode(request.headers.get("cache-control")))
    finally:
        await form.close()
    job = await state.speech.prepare(given, request_id_of(request.scope))
    return audio_response(await state.speech.serve(job))


def prompt_limits(settings: GatewaySettings) -> PromptLimits:
    return PromptLimits(
        max_bytes=settings.prompt_max_bytes,
        min_s=settings.prompt_min_s,
        max_s=settings.prompt_max_s,
    )


async def read_prompt(upload: object, limits: PromptLimits) -> PromptAudio | None:
    """The uploaded prompt, checked; None when no file was sent."""
    if upload is None or upload == "":
        return None
    if not isinstance(upload, UploadFile):
        raise ServiceError(ErrorCode.INVALID_REQUEST, "prompt_audio must be a file upload.")
    data = await upload.read(limits.max_bytes + 1)
    return check_prompt(data, limits)


async def _form_input(form: FormData, limits: PromptLimits, mode: CacheMode) -> SpeechInput:
    text = _text_field(form, "text")
    if text is None:
        raise ServiceError(ErrorCode.INVALID_REQUEST, "text: Field required")
    speed_field = _text_field(form, "speed")
    try:
        speed = float(speed_field) if speed_field else 1.0
    except ValueError:
        raise ServiceError(ErrorCode.INVALID_REQUEST, "speed: must be a number") from None
    return SpeechInput(
        text=text,
        format=audio_format(_text_field(form, "format") or AudioFormat.PCM_F32LE.value),
        voice=_text_field(form, "voice") or None,
        instruction=_text_field(form, "instruction") or None,
        prompt=await read_prompt(form.get("prompt_audio"), limits),
        prompt_text=_text_field(form, "prompt_text") or None,
        speed=speed,
        cache_mode=mode,
    )


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServiceError(ErrorCode.INVALID_REQUEST, f"{name}: must be a text field")
    return value


class BatchItem(BaseModel):
    """One item of a batch; format, speed and text limits are checked after parsing."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(json_schema_extra={"minLength": 1})
    voice: str | None = None
    instruction: str | None = None
    prompt_text: str | None = None
    format: str = Field(
        default=AudioFormat.PCM_F32LE.value, json_schema_extra={"enum": list(ALL_FORMATS)}
    )
    speed: float = Field(default=1.0, json_schema_extra={"minimum": 0.25, "maximum": 4.0})


class BatchBody(BaseModel):
    """What the route parses: items stay raw so that each is validated on its own."""

    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1)


class BatchRequest(BaseModel):
    """The batch body as documented: BatchBody with its items' shape."""

    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(min_length=1)


async def synthesize_batch(request: Request) -> Response:
    """JSON `{"items": [...]}`; answers 200 with one result per item, in order.

    Each item is validated, cached and dispatched on its own, in order, at most
    GATEWAY_BATCH_CONCURRENCY at a time (gateway.batch); a bad item gets its own `status` and
    `error` while the others succeed. A client that hangs up cancels the batch's items. A
    successful result carries the whole audio as base64 with its cache outcome, key, content
    type, format and sample rate.
    """
    require_content_type(request, "application/json")
    body = parse_model(BatchBody, await request.body())
    state = gateway_state(request)
    if len(body.items) > state.settings.batch_max_items:
        raise ServiceError(
            ErrorCode.INVALID_REQUEST,
            f"A batch holds at most {state.settings.batch_max_items} items.",
        )
    mode = cache_mode(request.headers.get("cache-control"))
    request_id = request_id_of(request.scope)
    items = [
        partial(_batch_item, state.speech, index, item, mode, f"{request_id}-{index}")
        for index, item in enumerate(body.items)
    ]
    try:
        results = await run_batch(
            items, concurrency=state.settings.batch_concurrency, receive=request.receive
        )
    except BatchAbandonedError:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; logs and metrics do
    return JSONResponse({"object": "list", "results": results})


async def _batch_item(
    speech: SpeechService, index: int, raw: dict[str, Any], mode: CacheMode, request_id: str
) -> dict[str, Any]:
    try:
        item = parse_model(BatchItem, raw)
        given = SpeechInput(
            text=item.text,
            format=audio_format(item.format),
            voice=item.voice,
            instruction=item.instruction,
            prompt_text=item.prompt_text,
            speed=item.speed,
            cache_mode=mode,
        )
        result = await speech.collect(await speech.prepare(given, request_id))
    except ServiceError as error:
        return {"index": index, "status": error.status, **error.body()}
    except PassThroughError as error:
        return {"index": index, "status": error.status, **_pass_through_body(error)}
    except FlightAbortedError:
        code = ErrorCode.UPSTREAM_ERROR
        body = error_body(code, "The worker's stream broke before the end.")
        return {"index": index, "status": STATUS_BY_CODE[code], **body}
    assert result.body is not None
    return {
        "index": index,
        "status": 200,
        "cache": result.cache,
        "cache_key": result.key,
        "content_type": result.headers.get("Content-Type"),
        "format": result.headers.get("X-Audio-Format"),
        "sample_rate": int(result.headers.get("X-Sample-Rate", "0")),
        "audio": base64.b64encode(result.body).decode(),
    }


def _pass_through_body(error: PassThroughError) -> dict[str, Any]:
    try:
        parsed = json.loads(error.body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed
    return error_body(ErrorCode.UPSTREAM_ERROR, "The worker refused the item.")


BODY_MODELS: tuple[type[BaseModel], ...] = (SynthesizeForm, SynthesizeUrlencodedForm, BatchRequest)

ROUTES = [
    APIRoute(
        "/synthesize",
        synthesize,
        methods=["POST"],
        summary="Synthesize speech from a form (the seed service's call)",
        response_class=Response,
        responses={
            **audio_doc("The audio, streamed as it is made; default raw float32 PCM."),
            **errors(401, 413, 415, 422, 429, 502, 503, 504),
        },
        openapi_extra=request_body(
            {
                "multipart/form-data": SynthesizeForm,
                "application/x-www-form-urlencoded": SynthesizeUrlencodedForm,
            }
        ),
    ),
    APIRoute(
        "/synthesize_batch",
        synthesize_batch,
        methods=["POST"],
        summary="Synthesize many items; each succeeds or fails on its own",
        response_model=BatchResponse,
        responses=errors(400, 401, 413, 415, 422, 429, 502, 503),
        openapi_extra=request_body({"application/json": BatchRequest}),
    ),
]
