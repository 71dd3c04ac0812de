"""Log lines written from engine threads carry the request id (run_in_executor too)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.logging_setup import RequestIdFilter, request_id_var
from worker.request_id import install_context_executor


async def test_run_in_executor_threads_see_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    executor = install_context_executor(max_workers=2)
    logger = logging.getLogger("engine.thread")
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="engine.thread")

    def work(label: str) -> str:
        logger.info("step %s", label)
        return request_id_var.get()

    async def request(request_id: str) -> str:
        request_id_var.set(request_id)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, work, request_id)

    try:
        seen = await asyncio.gather(*(request(f"req-{n}") for n in range(6)))
    finally:
        executor.shutdown(wait=True)
    assert seen == [f"req-{n}" for n in range(6)]
    by_message = {record.getMessage(): record.request_id for record in caplog.records}  # type: ignore[attr-defined]
    assert by_message == {f"step req-{n}": f"req-{n}" for n in range(6)}
