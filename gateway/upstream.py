"""The relay to workers: one pooled keep-alive httpx client, bounded timeouts, errors mapped.

Faults become contract errors before the first byte: a worker's 503 "busy" (and a 502 from
nginx's worker listener) is retried a few times with a short doubling back-off (nginx in front
of the workers picks another one), within one total retry budget (`upstream_retry_budget_s`,
queue waits on the workers included), then passed on with `Retry-After`; connection failures are
502 `upstream_unavailable`; timeouts are 504 `upstream_timeout`; a worker's own 4xx JSON
error is passed through unchanged. A stream that breaks after its first byte raises
`UpstreamAbortedError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from contract.audio import (
    CHANNELS_HEADER,
    FORMAT_HEADER,
    SAMPLE_FORMAT_HEADER,
    SAMPLE_RATE_HEADER,
)
from contract.errors import ErrorCode, ServiceError
from contract.info import INFO_PATH
from contract.requests import (
    ENGINE_HEADER,
    MAX_QUEUE_WAIT_HEADER,
    MODEL_VERSION_HEADER,
    REQUEST_ID_HEADER,
    SYNTHESIZE_PATH,
    VOICE_FEATURES_PATH,
    SynthesisRequest,
    VoiceFeaturesRequest,
)
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

AUDIO_HEADERS = (
    "Content-Type",
    SAMPLE_RATE_HEADER,
    FORMAT_HEADER,
    CHANNELS_HEADER,
    SAMPLE_FORMAT_HEADER,
)


# Answers that come before any audio and mean "try again": a worker's 503 busy, and the 502 that
# nginx's worker listener gives when the worker it chose failed before answering. Synthesis is
# idempotent (sampling is seeded from the request), so sending the request again is safe.
_RETRYABLE = {503: "busy", 502: "unavailable"}


class PassThroughError(Exception):
    """A worker's own 4xx answer, relayed to the client byte for byte."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"worker answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class UpstreamAbortedError(Exception):
    """The worker's stream broke after it had started; the response must be aborted."""


class UpstreamStream:
    """An open worker response: its audio headers and its body, read as it arrives."""

    def __init__(self, response: httpx.Response, metrics: GatewayMetrics) -> None:
        self._response = response
        self._metrics = metrics
        self.headers = {
            name: response.headers[name] for name in AUDIO_HEADERS if name in response.headers
        }
        self.model_version = response.headers.get(MODEL_VERSION_HEADER, "")
        """The model version of the worker that made this audio (`X-Model-Version`)."""

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                if chunk:
                    yield chunk
        except httpx.HTTPError as error:
            self._metrics.upstream_aborted.inc()
            raise UpstreamAbortedError(f"worker stream broke: {type(error).__name__}") from error

    async def aclose(self) -> None:
        await self._response.aclose()


@dataclass(frozen=True)
class ComputedFeatures:
    """A registered voice's features as a worker computed them, and what computed them."""

    data: bytes
    engine: str
    model_version: str


class Upstream:
    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._metrics = metrics
        self._retries = settings.upstream_busy_retries
        self._backoff_s = settings.upstream_busy_backoff_s
        self._retry_budget_s = settings.upstream_retry_budget_s
        self._client = httpx.AsyncClient(
            base_url=settings.worker_url,
            transport=transport,
            timeout=httpx.Timeout(
                connect=settings.upstream_connect_timeout_s,
                read=settings.upstream_read_timeout_s,
                write=settings.upstream_read_timeout_s,
                pool=settings.upstream_connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=settings.upstream_max_connections,
                keepalive_expiry=30.0,
            ),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def open_stream(
        self, request: SynthesisRequest, request_id: str, *, deadline: float | None = None
    ) -> UpstreamStream:
        """Start a synthesis on a worker and return once its 200 headers have arrived.

        `deadline` (`time.monotonic()`) is the request's; retries never run past it.
        """
        body = request.model_dump_json(exclude_none=True).encode()
        response = await self._with_retries(SYNTHESIZE_PATH, body, request_id, deadline)
        return UpstreamStream(response, self._metrics)

    async def voice_features(
        self, request: VoiceFeaturesRequest, request_id: str
    ) -> ComputedFeatures:
        """A prompt's features from a worker (`POST /v1/voices/features`), retried when busy.

        A worker's 4xx (a bad prompt) is raised as `PassThroughError`, like a synthesis's.
        """
        body = request.model_dump_json(exclude_none=True).encode()
        response = await self._with_retries(VOICE_FEATURES_PATH, body, request_id, None)
        await self._read_and_close(response)
        return ComputedFeatures(
            data=response.content,
            engine=response.headers.get(ENGINE_HEADER, ""),
            model_version=response.headers.get(MODEL_VERSION_HEADER, ""),
        )

    async def _with_retries(
        self, path: str, body: bytes, request_id: str, deadline: float | None
    ) -> httpx.Response:
        """POST `body` until a worker answers 200 (its response is returned, unread).

        A "try again" answer (`_RETRYABLE`) is retried with a doubling back-off, at most
        `upstream_busy_retries` times and only while the retry budget lasts: every attempt
        tells the worker how long it may queue the request (`X-Max-Queue-Wait`, the budget's
        remainder), so that the last refusal reaches the client within the budget (and never
        past `deadline`), however long the workers' own queue timeout is.
        """
        budget_end = time.monotonic() + self._retry_budget_s
        if deadline is not None:
            budget_end = min(budget_end, deadline)
        attempt = 0
        while True:
            queue_wait = max(0.0, budget_end - time.monotonic())
            headers = {
                "Content-Type": "application/json",
                REQUEST_ID_HEADER: request_id,
                MAX_QUEUE_WAIT_HEADER: f"{queue_wait:.3f}",
            }
            response = await self._send("POST", path, content=body, headers=headers)
            if response.status_code == 200:
                self._metrics.upstream_attempts.labels(outcome="ok").inc()
                return response
            await self._read_and_close(response)
            outcome = _RETRYABLE.get(response.status_code)
            delay = self._backoff_s * 2**attempt
            if (
                outcome is None
                or attempt >= self._retries
                or time.monotonic() + delay >= budget_end
            ):
                raise self._error_for(response)
            self._metrics.upstream_attempts.labels(outcome=outcome).inc()
            await asyncio.sleep(delay)
            attempt += 1

    async def info(self) -> dict[str, Any]:
        """The engine capabilities a worker reports at GET /v1/info."""
        response = await self._send("GET", INFO_PATH)
        await self._read_and_close(response)
        if response.status_code != 200:
            raise self._error_for(response)
        data = response.json()
        if not isinstance(data, dict):
            raise ServiceError(ErrorCode.UPSTREAM_ERROR, "The worker sent unreadable capabilities.")
        return data

    async def ready(self) -> bool:
        try:
            response = await self._send("GET", "/readyz")
        except ServiceError:
            return False
        await self._read_and_close(response)
        return response.status_code == 200

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        request = self._client.build_request(method, path, **kwargs)
        try:
            return await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            self._metrics.upstream_attempts.labels(outcome="connect_error").inc()
            raise ServiceError(
                ErrorCode.UPSTREAM_UNAVAILABLE, "No worker could be reached."
            ) from error
        except httpx.TimeoutException as error:
            self._metrics.upstream_attempts.labels(outcome="timeout").inc()
            raise ServiceError(
                ErrorCode.UPSTREAM_TIMEOUT, "The worker did not answer in time."
            ) from error
        except httpx.TransportError as error:
            self._metrics.upstream_attempts.labels(outcome="connect_error").inc()
            raise ServiceError(
                ErrorCode.UPSTREAM_UNAVAILABLE, "The connection to the worker failed."
            ) from error

    async def _read_and_close(self, response: httpx.Response) -> None:
        try:
            await response.aread()
        except httpx.TimeoutException as error:
            raise ServiceError(
                ErrorCode.UPSTREAM_TIMEOUT, "The worker did not answer in time."
            ) from error
        except httpx.HTTPError as error:
            raise ServiceError(
                ErrorCode.UPSTREAM_UNAVAILABLE, "The connection to the worker failed."
            ) from error
        finally:
            await response.aclose()

    def _error_for(self, response: httpx.Response) -> Exception:
        status = response.status_code
        retry_after = response.headers.get("Retry-After", "1")
        if status == 503:
            return ServiceError(
                ErrorCode.BUSY,
                "All workers are busy; retry shortly.",
                headers={"Retry-After": retry_after},
            )
        self._metrics.upstream_attempts.labels(outcome="http_error").inc()
        if status == 502:
            return ServiceError(
                ErrorCode.UPSTREAM_UNAVAILABLE,
                "No worker could take the request.",
                headers={"Retry-After": retry_after},
            )
        if status == 504:
            return ServiceError(ErrorCode.UPSTREAM_TIMEOUT, "The worker did not answer in time.")
        if 400 <= status < 500:
            return PassThroughError(
                status, response.content, response.headers.get("Content-Type", "application/json")
            )
        logger.warning("worker answered %s", status)
        return ServiceError(ErrorCode.UPSTREAM_ERROR, "A worker failed to answer.")
