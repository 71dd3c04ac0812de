"""`POST /v1/voices/features`: a prompt recording's features, computed once, for a gateway to store.

The body is JSON (`contract.requests.VoiceFeaturesRequest`); the answer is the engine's
feature blob as application/octet-stream, with `X-Engine` and `X-Model-Version` naming what
made it. A request later brings the blob back as `voice_features`, so any worker of the same
model version can serve a registered voice without shared state.

The prompt is checked before any work (not audio 415; too short, too long or silent 422;
engines that cannot clone 422 `prompt_unsupported`), and the computation takes a synthesis
slot: it competes with syntheses for the same CPU or GPU, and is refused with 503 `busy` when
the worker is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import Counter
from pydantic import ValidationError

from contract.errors import ErrorCode, ServiceError
from contract.requests import (
    ENGINE_HEADER,
    MAX_QUEUE_WAIT_HEADER,
    MODEL_VERSION_HEADER,
    VOICE_FEATURES_PATH,
    VoiceFeaturesRequest,
    check_text,
)
from worker.body import read_body, require_json
from worker.validation import decode_prompt, describe_error

if TYPE_CHECKING:
    from worker.app import WorkerState

logger = logging.getLogger(__name__)


def parse_features_body(body: bytes) -> VoiceFeaturesRequest:
    """JSON bytes to a VoiceFeaturesRequest; 400 invalid_json, 422 invalid_request."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServiceError(ErrorCode.INVALID_JSON, f"The body is not valid JSON: {e}") from e
    try:
        return VoiceFeaturesRequest.model_validate(data)
    except ValidationError as e:
        raise ServiceError(ErrorCode.INVALID_REQUEST, describe_error(e)) from e


def install_voice_routes(app: FastAPI, state: WorkerState) -> None:
    """Add the features route; its counter joins the worker's metrics registry."""
    computed = Counter(
        "worker_voice_features",
        "Voice feature requests by HTTP status and error code ('' when features were computed).",
        ["status", "code"],
        registry=state.metrics.registry,
    )
    settings = state.settings

    @app.post(VOICE_FEATURES_PATH)
    async def voice_features(request: Request) -> Response:
        try:
            require_json(request)
            parsed = parse_features_body(await read_body(request, settings.max_body_bytes))
            state.require_ready()
            capabilities = state.engine.capabilities()
            if not capabilities.supports_cloning:
                raise ServiceError(
                    ErrorCode.PROMPT_UNSUPPORTED,
                    f"The {capabilities.engine} engine cannot clone a voice from prompt audio.",
                )
            text = parsed.prompt_text or ""
            if text.strip():
                text = check_text(text, settings.max_text_chars)
            audio, rate = decode_prompt(parsed.prompt_audio)
            await state.admission.acquire(
                max_wait=state.limits.queue_wait(request.headers.get(MAX_QUEUE_WAIT_HEADER))
            )
            work = asyncio.ensure_future(
                asyncio.to_thread(state.engine.compute_voice, audio, rate, text.strip())
            )
            # The slot is held until the computation ends, even if the client hangs up first.
            work.add_done_callback(lambda _: state.admission.release())
            blob = await asyncio.shield(work)
        except ServiceError as e:
            computed.labels(status=str(e.status), code=e.code.value).inc()
            raise
        except asyncio.CancelledError:
            computed.labels(status="499", code="client_disconnected").inc()
            raise
        except Exception:
            computed.labels(status="500", code=ErrorCode.INTERNAL_ERROR.value).inc()
            raise
        computed.labels(status="200", code="").inc()
        logger.info("Voice features computed: %d bytes", len(blob))
        return Response(
            blob,
            media_type="application/octet-stream",
            headers={
                ENGINE_HEADER: capabilities.engine,
                MODEL_VERSION_HEADER: capabilities.model_version,
            },
        )
