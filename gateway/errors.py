"""One place that turns every failure into the contract's JSON error body and status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from contract.errors import STATUS_BY_CODE, ErrorCode, ServiceError, error_body
from gateway.single_flight import FlightAbortedError
from gateway.upstream import PassThroughError

logger = logging.getLogger(__name__)

ERROR_CODE_SCOPE_KEY = "gateway.error_code"

_HTTP_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def error_response(
    request: Request, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request.scope[ERROR_CODE_SCOPE_KEY] = code.value
    return JSONResponse(
        error_body(code, message), status_code=STATUS_BY_CODE[code], headers=headers
    )


def validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "The request is invalid."


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc.code, exc.message, exc.headers)


async def _pass_through(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PassThroughError)
    try:
        code = json.loads(exc.body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "upstream_client_error"
    request.scope[ERROR_CODE_SCOPE_KEY] = str(code)
    return Response(exc.body, status_code=exc.status, media_type=exc.content_type)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if any(item.get("type") == "json_invalid" for item in exc.errors()):
        return error_response(request, ErrorCode.INVALID_JSON, "The body is not valid JSON.")
    return error_response(request, ErrorCode.INVALID_REQUEST, validation_message(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
    if exc.status_code >= 500:
        code = ErrorCode.INTERNAL_ERROR
    response = error_response(
        request, code, str(exc.detail) if exc.status_code < 500 else "Internal error."
    )
    response.status_code = exc.status_code
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, FlightAbortedError):
        # Logged where it happened; raising it on is what aborts the client's stream.
        return error_response(request, ErrorCode.UPSTREAM_ERROR, "The stream broke.")
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, ErrorCode.INTERNAL_ERROR, "Internal error.")


class AbortedStreamFilter(logging.Filter):
    """Drops the server's traceback for a stream aborted on purpose (already logged once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], FlightAbortedError))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(PassThroughError, _pass_through)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
