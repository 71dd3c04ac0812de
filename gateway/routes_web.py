"""The web page at `/` and `/web`, and its assets under `/web/assets/`, all from this package.

No build step and no CDN: the page is one HTML file, one script, one style sheet and an icon,
served as they are, so it works on a cluster with no network but its own. The HTML carries the
gateway's text limit (for its character counter), whether API keys are required (the page then
asks for one before calling the API), and a Content-Security-Policy that lets it load and reach
nothing but this origin. Only the files listed here are served; any other name
under `/web/assets/` is a 404 JSON error, so no path can reach outside the folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from contract.errors import ErrorCode, ServiceError
from gateway.state import gateway_state

WEB_DIR = Path(__file__).parent / "web"
PAGE_PATHS = ("/", "/web")
ASSETS_PREFIX = "/web/assets/"
ASSET_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
MAX_CHARS_PLACEHOLDER = "{{max_text_chars}}"
API_KEYS_PLACEHOLDER = "{{api_keys}}"
# Audio the page plays or offers for download lives in blob: URLs it makes itself.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on each load (ETag on assets), so a new version shows at once.
    "Cache-Control": "no-cache",
}


def is_web_path(path: str) -> bool:
    """Paths of the page and its assets: public even when API keys are required, since the
    key is typed into the page itself."""
    return path in PAGE_PATHS or path.startswith(ASSETS_PREFIX)


@functools.cache
def _page(max_text_chars: int, keys_required: bool) -> bytes:
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    html = html.replace(MAX_CHARS_PLACEHOLDER, str(max_text_chars))
    return html.replace(API_KEYS_PLACEHOLDER, "required" if keys_required else "off").encode()


async def page(request: Request) -> Response:
    """The page; its script reads the text limit and whether keys are required from meta tags
    (`tts-max-text-chars`, `tts-api-keys`)."""
    settings = gateway_state(request).settings
    body = _page(settings.max_text_chars, bool(settings.api_keys))
    return HTMLResponse(body, headers=SECURITY_HEADERS)


async def root_page(request: Request) -> Response:
    """The same page at `/`."""
    return await page(request)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "No such route.")
    return FileResponse(WEB_DIR / "assets" / name, media_type=media_type, headers=SECURITY_HEADERS)


ROUTES = [
    APIRoute("/", root_page, methods=["GET"], include_in_schema=False),
    APIRoute("/web", page, methods=["GET"], include_in_schema=False),
    APIRoute("/web/assets/{name}", asset, methods=["GET"], include_in_schema=False),
]
