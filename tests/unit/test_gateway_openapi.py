"""The gateway's OpenAPI schema: what it declares, and that the app answers as declared."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.schemas import ModelList, Readiness, VoiceList
from gateway.settings import GatewaySettings
from tests.unit.test_gateway_api import FakeRedis, MockWorker

PUBLIC_OPERATIONS = {
    ("post", "/v1/audio/speech"),
    ("post", "/synthesize"),
    ("post", "/synthesize_batch"),
    ("get", "/v1/voices"),
    ("post", "/v1/voices"),
    ("get", "/v1/voices/{voice_id}"),
    ("delete", "/v1/voices/{voice_id}"),
    ("get", "/v1/models"),
    ("get", "/healthz"),
    ("get", "/livez"),
    ("get", "/readyz"),
}
ERROR_REF = "#/components/schemas/ErrorBody"


def schema_of(**settings: Any) -> dict[str, Any]:
    openapi: dict[str, Any] = create_app(GatewaySettings(**settings)).openapi()
    return openapi


def operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }


def component(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        GatewaySettings(),
        upstream_transport=httpx.MockTransport(MockWorker().handle),
        redis=FakeRedis(),  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as http:
        yield http
    await app.state.gateway.speech._upstream.aclose()


def test_every_public_operation_and_nothing_internal_is_declared() -> None:
    schema = schema_of()
    assert schema["openapi"].startswith("3.1")
    assert set(operations(schema)) == PUBLIC_OPERATIONS
    assert "/metrics" not in schema["paths"]


def test_errors_use_the_contract_body() -> None:
    schema = schema_of()
    for (method, path), operation in operations(schema).items():
        errors = {code: r for code, r in operation["responses"].items() if int(code) >= 400}
        assert errors or path in {"/healthz", "/livez"}, f"{method} {path} declares no error"
        for code, response in errors.items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == ERROR_REF, f"{method} {path} {code}"
    body = component(schema, ERROR_REF)
    assert body["required"] == ["error"]
    assert component(schema, body["properties"]["error"]["$ref"])["required"] == [
        "code",
        "message",
    ]
    speech = operations(schema)[("post", "/v1/audio/speech")]["responses"]
    assert {"400", "401", "413", "415", "422", "429", "502", "503", "504"} <= set(speech)


def test_speech_body_and_responses_are_declared_in_full() -> None:
    schema = schema_of(max_text_chars=300)
    operation = operations(schema)[("post", "/v1/audio/speech")]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = component(schema, ref)
    props = body["properties"]
    assert set(props) == {
        "model",
        "input",
        "voice",
        "response_format",
        "speed",
        "prompt_text",
        "instructions",
        "stream_format",
    }
    assert body["required"] == ["model", "input"]
    assert body["additionalProperties"] is False
    assert {"mp3", "opus", "flac", "wav", "pcm"} <= set(props["response_format"]["enum"])
    assert (props["speed"]["minimum"], props["speed"]["maximum"]) == (0.25, 4.0)
    assert props["stream_format"]["enum"] == ["audio", "sse"]
    assert props["input"]["maxLength"] == 300
    content = operation["responses"]["200"]["content"]
    assert {"audio/mpeg", "audio/wav", "audio/pcm", "text/event-stream"} <= set(content)
    assert content["audio/mpeg"]["schema"] == {"type": "string", "format": "binary"}


def test_form_bodies_declare_their_fields() -> None:
    schema = schema_of(batch_max_items=5)
    ops = operations(schema)
    form = ops[("post", "/synthesize")]["requestBody"]["content"]["multipart/form-data"]
    fields = component(schema, form["schema"]["$ref"])["properties"]
    assert set(fields) == {
        "text",
        "instruction",
        "voice",
        "format",
        "speed",
        "prompt_text",
        "prompt_audio",
    }
    assert fields["prompt_audio"]["format"] == "binary"
    voice = ops[("post", "/v1/voices")]["requestBody"]["content"]["multipart/form-data"]
    assert component(schema, voice["schema"]["$ref"])["required"] == ["prompt_audio"]
    batch = ops[("post", "/synthesize_batch")]["requestBody"]["content"]["application/json"]
    assert component(schema, batch["schema"]["$ref"])["properties"]["items"]["maxItems"] == 5


def test_api_keys_are_declared_for_all_but_health() -> None:
    schema = schema_of(api_keys="k1")
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (_, path), operation in operations(schema).items():
        secured = operation.get("security") == [{"bearer": []}]
        assert secured == (path not in {"/healthz", "/livez", "/readyz"}), path


async def test_schema_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert set(operations(response.json())) == PUBLIC_OPERATIONS


@pytest.mark.parametrize(
    "content",
    [
        b'--zzz\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi',
        b"".join(
            b'--zzz\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % n
            for n in range(40)
        )
        + b"--zzz--\r\n",
    ],
    ids=["truncated", "too-many-fields"],
)
async def test_unreadable_forms_are_422_invalid_request(
    client: httpx.AsyncClient, content: bytes
) -> None:
    for path in ("/synthesize", "/v1/voices"):
        response = await client.post(
            path,
            content=content,
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
        )
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_request"


async def test_answers_match_their_declared_models(client: httpx.AsyncClient) -> None:
    ModelList.model_validate((await client.get("/v1/models")).json())
    VoiceList.model_validate((await client.get("/v1/voices")).json())
    Readiness.model_validate((await client.get("/readyz")).json())
