"""Plain ASGI middleware: take `X-Request-ID` (or make one), keep it in a contextvar, echo it."""

from __future__ import annotations

import asyncio
import contextvars
import re
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.requests import REQUEST_ID_HEADER
from worker.logging_setup import request_id_var

_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

P = ParamSpec("P")
T = TypeVar("T")


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A thread pool whose tasks run in a copy of the submitter's context variables.

    `loop.run_in_executor` (unlike `asyncio.to_thread`) does not carry context variables into
    the thread, so log lines written there lost the request id. Installed as the worker loop's
    default executor, it gives every `run_in_executor(None, ...)` the caller's context.
    """

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        context = contextvars.copy_context()
        return super().submit(context.run, fn, *args, **kwargs)  # type: ignore[arg-type]


def install_context_executor(max_workers: int | None = None) -> ContextThreadPoolExecutor:
    """Make the running loop's default executor carry context variables (request ids)."""
    executor = ContextThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="engine")
    asyncio.get_running_loop().set_default_executor(executor)
    return executor


__all__ = ["ContextThreadPoolExecutor", "RequestIdMiddleware", "install_context_executor"]


class RequestIdMiddleware:
    """A valid incoming id (1-128 URL-safe characters) is kept; anything else gets a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
