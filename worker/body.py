"""Reading a JSON request body: the media type is checked and the size is bounded as it arrives."""

from __future__ import annotations

from starlette.requests import Request

from contract.errors import ErrorCode, ServiceError


def require_json(request: Request) -> None:
    """415 `unsupported_media_type` unless the body is declared application/json."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ServiceError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE, "Send the request as application/json."
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body; 413 `payload_too_large` as soon as it is declared or read past `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body.extend(part)
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> ServiceError:
    return ServiceError(ErrorCode.PAYLOAD_TOO_LARGE, f"The body is over {limit} bytes.")
