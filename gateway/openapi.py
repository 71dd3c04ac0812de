"""The public OpenAPI 3.1 schema: response declarations for the routes, and its assembly.

The routes are FastAPI routes whose endpoints read their own bodies (so the cache-hit path and
the contract's error codes stay as they are); their request bodies are declared here from the
same pydantic models the routes validate with, and limits that come from settings (text
length, batch size, API keys) are written into the schema of the app that enforces them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from contract.audio import CONTENT_TYPES, FORMAT_HEADER, SAMPLE_RATE_HEADER
from gateway.schemas import ErrorBody, SpeechAudioDelta, SpeechAudioDone
from gateway.settings import GatewaySettings

REF_TEMPLATE = "#/components/schemas/{model}"
PUBLIC_HEALTH_PATHS = ("/healthz", "/livez", "/readyz")

_ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON (`invalid_json`).",
    401: "A valid API key is required (`unauthorized`); only when keys are configured.",
    403: "The voice is built into the engine and cannot be deleted (`forbidden`).",
    404: "No such voice (`voice_not_found`) or route (`not_found`).",
    413: "The body or the prompt upload is too large.",
    415: "Wrong Content-Type, or a prompt upload that is not audio.",
    422: "The request is well-formed but invalid (see the error code).",
    429: "Too many requests (nginx's rate limit).",
    502: "No worker could be reached, or a worker failed.",
    503: "Every worker is busy (`busy`) or none is ready (`not_ready`); see Retry-After.",
    504: "A worker timed out, or the synthesis ran past the request deadline.",
}

_AUDIO_HEADERS: dict[str, Any] = {
    "X-Cache": {
        "description": "Whether the audio came from the cache.",
        "schema": {"type": "string", "enum": ["HIT", "MISS", "BYPASS"]},
    },
    "X-Cache-Key": {"description": "The request's cache key.", "schema": {"type": "string"}},
    SAMPLE_RATE_HEADER: {"description": "Sample rate in Hz.", "schema": {"type": "string"}},
    FORMAT_HEADER: {"description": "The audio format's name.", "schema": {"type": "string"}},
    "X-Request-ID": {"description": "The request's id.", "schema": {"type": "string"}},
}


_SSE_EVENT: dict[str, Any] = {
    "description": "One Server-Sent Event: `speech.audio.delta` events, then one "
    "`speech.audio.done`.",
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "const": "message"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "oneOf": [
                    {"$ref": REF_TEMPLATE.format(model=model.__name__)}
                    for model in (SpeechAudioDelta, SpeechAudioDone)
                ]
            },
        },
    },
}
"""OpenAPI 3.1 leaves a stream's `schema` open; here it describes each event, as tools read it."""
SSE_MODELS: tuple[type[BaseModel], ...] = (SpeechAudioDelta, SpeechAudioDone)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Response declarations for error statuses, each with the contract's error body."""
    return {
        status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def audio_response(description: str, *, sse: bool = False) -> dict[int | str, dict[str, Any]]:
    """A 200 that streams audio in any of the contract's formats (or SSE events)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    content: dict[str, Any] = dict.fromkeys(CONTENT_TYPES.values(), binary)
    if sse:
        content["text/event-stream"] = {"schema": _SSE_EVENT}
    return {200: {"description": description, "content": content, "headers": _AUDIO_HEADERS}}


def request_body(content: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its own body: media type -> documenting model."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                media_type: {"schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}}
                for media_type, model in content.items()
            },
        }
    }


def install_openapi(
    app: FastAPI, settings: GatewaySettings, body_models: Iterable[type[BaseModel]]
) -> None:
    """Serve the schema at /openapi.json, built once from the app's routes and `settings`."""
    models = [*body_models, *SSE_MODELS]

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app, settings, models)
        return app.openapi_schema

    setattr(app, "openapi", build)  # noqa: B010 - FastAPI documents replacing app.openapi


def _build(
    app: FastAPI, settings: GatewaySettings, models: list[type[BaseModel]]
) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template=REF_TEMPLATE
    )
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definitions.get("$defs", {}))
    for name, field in (("SpeechBody", "input"), ("SynthesizeForm", "text")):
        components[name]["properties"][field]["maxLength"] = settings.max_text_chars
    components["SynthesizeUrlencodedForm"]["properties"]["text"]["maxLength"] = (
        settings.max_text_chars
    )
    # The engine's own model name is accepted too; it is known only once workers answer.
    components["SpeechBody"]["properties"]["model"]["enum"] = list(settings.model_names)
    components["BatchRequest"]["properties"]["items"]["maxItems"] = settings.batch_max_items
    components["BatchItem"]["properties"]["text"]["maxLength"] = settings.max_text_chars
    if settings.api_keys:
        _require_bearer(schema)
    return schema


def _require_bearer(schema: dict[str, Any]) -> None:
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        if path in PUBLIC_HEALTH_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
