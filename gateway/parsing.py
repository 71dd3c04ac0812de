"""Request-body parsing shared by the routes: content type, JSON into a model, audio format."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

from contract.audio import AudioFormat
from contract.errors import ErrorCode, ServiceError

M = TypeVar("M", bound=BaseModel)


def require_content_type(request: Request, *accepted: str) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in accepted:
        raise ServiceError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be {' or '.join(accepted)}.",
        )


async def read_form(request: Request, *, max_files: int, max_fields: int) -> FormData:
    """The request's form; a malformed one, or one with too many parts, is 422 invalid_request."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except HTTPException as error:
        raise ServiceError(
            ErrorCode.INVALID_REQUEST, f"The form cannot be read: {error.detail}"
        ) from error


def parse_model(model: type[M], body: bytes | dict[str, Any] | Any) -> M:
    """Validate JSON bytes (or an already decoded object) into `model`, with contract errors."""
    try:
        if isinstance(body, bytes):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as error:
        raise validation_error(error) from error


def validation_error(error: ValidationError) -> ServiceError:
    items = error.errors()
    if any(item["type"] == "json_invalid" for item in items):
        return ServiceError(ErrorCode.INVALID_JSON, "The body is not valid JSON.")
    parts = []
    for item in items[:5]:
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location or 'body'}: {item['msg']}")
    return ServiceError(ErrorCode.INVALID_REQUEST, "; ".join(parts))


_FORMATS = {item.value: item for item in AudioFormat}


def audio_format(name: str) -> AudioFormat:
    found = _FORMATS.get(name)
    if found is None:
        known = ", ".join(_FORMATS)
        raise ServiceError(
            ErrorCode.UNSUPPORTED_FORMAT, f"Format {name!r} is not supported; use one of {known}."
        )
    return found
