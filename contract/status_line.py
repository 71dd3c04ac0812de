"""Reason phrases in HTTP/1.1 status lines (`HTTP/1.1 200 OK`, not `HTTP/1.1 200 `).

ASGI carries no reason phrase and Hypercorn sends h11 responses without one; nginx, which
proxies the status line it receives, then passes the empty phrase to every client. Both
services call `install_reason_phrases()` before serving: Hypercorn's HTTP/1.1 protocol then
builds its responses with the standard phrase of each status (`http.HTTPStatus`).
"""

from __future__ import annotations

import http
from typing import Any

import h11
import hypercorn.protocol.h11 as hypercorn_h11


def reason_phrase(status_code: int) -> bytes:
    try:
        return http.HTTPStatus(status_code).phrase.encode("ascii")
    except ValueError:
        return b""


class _H11WithReasons:
    """The `h11` module as Hypercorn's protocol sees it, with phrases filled in."""

    def __getattr__(self, name: str) -> Any:
        return getattr(h11, name)

    @staticmethod
    def Response(**fields: Any) -> h11.Response:  # noqa: N802 (h11's class name)
        fields.setdefault("reason", reason_phrase(int(fields["status_code"])))
        return h11.Response(**fields)

    @staticmethod
    def InformationalResponse(**fields: Any) -> h11.InformationalResponse:  # noqa: N802
        fields.setdefault("reason", reason_phrase(int(fields["status_code"])))
        return h11.InformationalResponse(**fields)


def install_reason_phrases() -> None:
    """Make Hypercorn's HTTP/1.1 responses carry reason phrases (idempotent)."""
    namespace = vars(hypercorn_h11)
    if not isinstance(namespace["h11"], _H11WithReasons):
        namespace["h11"] = _H11WithReasons()
