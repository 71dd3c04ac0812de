"""One log line per synthesis request, on the `gateway.requests` logger.

Off by default. With `redact_text` on (the privacy setting), a line carries the text's length
and a short SHA-256 instead of the text, so logs can be kept without keeping what was said.
"""

from __future__ import annotations

import hashlib
import json
import logging

from contract.requests import SynthesisRequest

logger = logging.getLogger("gateway.requests")


class RequestLog:
    def __init__(self, *, enabled: bool, redact_text: bool) -> None:
        self._enabled = enabled
        self._redact_text = redact_text
        if enabled:
            # Request lines are INFO, below the WARNING default of the other loggers.
            logger.setLevel(logging.INFO)

    def record(
        self, *, request_id: str, cache: str, key: str, synthesis: SynthesisRequest
    ) -> None:
        if not self._enabled:
            return
        fields: dict[str, object] = {
            "request_id": request_id,
            "cache": cache,
            "key": key,
            "voice": synthesis.voice,
            "format": synthesis.format.value,
            "speed": synthesis.speed,
            "chars": len(synthesis.text),
        }
        if self._redact_text:
            fields["text_sha256"] = hashlib.sha256(synthesis.text.encode()).hexdigest()[:16]
        else:
            fields["text"] = synthesis.text
            fields["instruction"] = synthesis.instruction
        logger.info("synthesis request %s", json.dumps(fields, ensure_ascii=False))
