"""One list of error codes, each with its HTTP status, and the JSON body every error uses."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Malformed requests.
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # Text.
    TEXT_EMPTY = "text_empty"
    TEXT_TOO_LONG = "text_too_long"
    TEXT_INVALID = "text_invalid"
    # Voice, format, speed and modes.
    UNKNOWN_VOICE = "unknown_voice"
    VOICE_NOT_FOUND = "voice_not_found"
    VOICE_OUTDATED = "voice_outdated"
    UNSUPPORTED_FORMAT = "unsupported_format"
    SPEED_OUT_OF_RANGE = "speed_out_of_range"
    INSTRUCTION_UNSUPPORTED = "instruction_unsupported"
    PROMPT_UNSUPPORTED = "prompt_unsupported"
    # Prompt recordings.
    PROMPT_TOO_LARGE = "prompt_too_large"
    PROMPT_NOT_AUDIO = "prompt_not_audio"
    PROMPT_TOO_SHORT = "prompt_too_short"
    PROMPT_TOO_LONG = "prompt_too_long"
    PROMPT_SILENT = "prompt_silent"
    PROMPT_TEXT_WITHOUT_AUDIO = "prompt_text_without_audio"
    # Access.
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # Capacity and faults.
    BUSY = "busy"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    INTERNAL_ERROR = "internal_error"


STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.TEXT_EMPTY: 422,
    ErrorCode.TEXT_TOO_LONG: 422,
    ErrorCode.TEXT_INVALID: 422,
    ErrorCode.UNKNOWN_VOICE: 422,
    ErrorCode.VOICE_NOT_FOUND: 404,
    ErrorCode.VOICE_OUTDATED: 422,
    ErrorCode.UNSUPPORTED_FORMAT: 422,
    ErrorCode.SPEED_OUT_OF_RANGE: 422,
    ErrorCode.INSTRUCTION_UNSUPPORTED: 422,
    ErrorCode.PROMPT_UNSUPPORTED: 422,
    ErrorCode.PROMPT_TOO_LARGE: 413,
    ErrorCode.PROMPT_NOT_AUDIO: 415,
    ErrorCode.PROMPT_TOO_SHORT: 422,
    ErrorCode.PROMPT_TOO_LONG: 422,
    ErrorCode.PROMPT_SILENT: 422,
    ErrorCode.PROMPT_TEXT_WITHOUT_AUDIO: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BUSY: 503,
    ErrorCode.NOT_READY: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.UPSTREAM_UNAVAILABLE: 502,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.INTERNAL_ERROR: 500,
}


class ServiceError(Exception):
    """An error that reaches the client as `{"error": {"code", "message"}}` with its status.

    `message` is written for the client: never put exception text or internals in it.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"error": {"code": str(code), "message": message}}
