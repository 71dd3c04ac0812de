"""Optional Bearer API-key authentication, as plain ASGI middleware.

Off when no keys are configured. Otherwise every route but health, metrics, the API docs and
the web page (gateway.routes_web, where the key is typed in) needs
`Authorization: Bearer <key>` with a configured key; anything else gets 401 JSON.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from contract.errors import ErrorCode, error_body
from gateway.errors import ERROR_CODE_SCOPE_KEY
from gateway.routes_web import is_web_path

# The API description is public: Swagger UI at /docs reads /openapi.json without a key and
# sends the key typed into its "Authorize" dialog with the calls it makes.
EXEMPT_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/docs", "/openapi.json"})
_UNAUTHORIZED = json.dumps(
    error_body(ErrorCode.UNAUTHORIZED, "A valid API key is required (Authorization: Bearer <key>).")
).encode()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self._app = app
        self._keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in EXEMPT_PATHS
            or is_web_path(scope["path"])
            or self._authorized(scope)
        ):
            await self._app(scope, receive, send)
            return
        scope[ERROR_CODE_SCOPE_KEY] = ErrorCode.UNAUTHORIZED.value
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                token = token.strip()
                # Compare against every key so timing does not reveal which one matched.
                matched = False
                for key in self._keys:
                    matched |= hmac.compare_digest(token, key)
                return matched
        return False
