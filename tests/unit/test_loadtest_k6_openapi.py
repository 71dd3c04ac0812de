"""Every endpoint and request field that the k6 scenarios use exists in the gateway's OpenAPI
schema (`gateway.app.create_app(settings).openapi()`).

A schema with no paths, or an operation the scripts send a body to that declares none for
that content type, is a failure that names the gap.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.unit.test_loadtest_k6 import SCRIPTS, dry_run, needs_node

BODY_CONTENT_TYPES = {
    "json": "application/json",
    "multipart": "multipart/form-data",
    "form": "multipart/form-data",
}


def _gateway_openapi() -> dict[str, Any]:
    try:
        app_module = importlib.import_module("gateway.app")
        settings_module = importlib.import_module("gateway.settings")
    except ModuleNotFoundError as e:
        if e.name in ("gateway", "gateway.app", "gateway.settings"):
            pytest.skip(f"the gateway application is not there yet ({e.name} is missing)")
        raise
    settings = settings_module.GatewaySettings()
    schema: dict[str, Any] = app_module.create_app(settings).openapi()
    assert schema.get("paths"), "the gateway's OpenAPI schema declares no paths"
    return schema


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        node = schema["components"]["schemas"][name]
    return node


def _operation(schema: dict[str, Any], script: str, request: dict[str, Any]) -> dict[str, Any]:
    path = urlsplit(request["url"]).path
    assert path in schema["paths"], f"{script}: {path} is not in the OpenAPI schema"
    operation: dict[str, Any] | None = schema["paths"][path].get(request["method"].lower())
    assert operation is not None, f"{script}: {request['method']} {path} is not in the schema"
    return operation


@needs_node
@pytest.mark.parametrize("script", SCRIPTS)
def test_endpoints_exist_in_the_gateway_openapi_schema(script: str) -> None:
    schema = _gateway_openapi()
    for request in dry_run(script)["requests"]:
        _operation(schema, script, request)


@needs_node
@pytest.mark.parametrize("script", SCRIPTS)
def test_request_fields_exist_in_the_gateway_openapi_schema(script: str) -> None:
    schema = _gateway_openapi()
    for request in dry_run(script)["requests"]:
        operation = _operation(schema, script, request)
        body = request["body"]
        if body["kind"] == "none":
            continue
        content_type = BODY_CONTENT_TYPES[body["kind"]]
        content = operation.get("requestBody", {}).get("content", {})
        where = f"{request['method']} {urlsplit(request['url']).path}"
        assert content_type in content, (
            f"{script}: the schema declares no {content_type} request body for {where}"
        )
        declared = set(_resolve(schema, content[content_type]["schema"]).get("properties", {}))
        unknown = set(body["fields"]) - declared
        assert not unknown, f"{script}: {where} sends fields the schema lacks: {sorted(unknown)}"
