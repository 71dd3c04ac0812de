"""The web page's routes in-process: the page, its assets, and what stays out of reach."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.routes_web import ASSET_TYPES, WEB_DIR
from gateway.settings import GatewaySettings
from tests.unit.test_gateway_api import FakeRedis, MockWorker

KEY = "page-test-key"


def _client(settings: GatewaySettings) -> httpx.AsyncClient:
    app = create_app(
        settings,
        upstream_transport=httpx.MockTransport(MockWorker().handle),
        redis=FakeRedis(),  # type: ignore[arg-type]
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(max_text_chars=321, api_keys=[KEY])  # type: ignore[call-arg]
    async with _client(settings) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/web"])
async def test_page_is_served_without_a_key(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<meta name="tts-max-text-chars" content="321">' in response.text
    assert '<meta name="tts-api-keys" content="required">' in response.text
    assert "{{" not in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_page_without_keys_says_so() -> None:
    async with _client(GatewaySettings()) as client:
        response = await client.get("/")
    assert '<meta name="tts-api-keys" content="off">' in response.text
    assert '<meta name="tts-max-text-chars" content="4096">' in response.text


async def test_every_asset_the_page_names_is_served(client: httpx.AsyncClient) -> None:
    page = (await client.get("/")).text
    for name, media_type in ASSET_TYPES.items():
        assert f"/web/assets/{name}" in page
        response = await client.get(f"/web/assets/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == media_type
        assert response.content == (WEB_DIR / "assets" / name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/web/assets/missing.js",
        "/web/assets/..%2f..%2froutes_web.py",
        "/web/assets/%2e%2e/index.html",
        "/web/index.html",
    ],
)
async def test_other_paths_are_not_found(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_other_methods_are_refused_as_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/", content=b"x")
    assert response.status_code == 405
    assert response.json()["error"]["code"]


async def test_the_api_still_needs_the_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 401
    authorized = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert authorized.status_code == 200


async def test_page_routes_are_left_out_of_the_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})).json()
    assert not [path for path in paths["paths"] if path == "/" or path.startswith("/web")]
