"""The gateway's public OpenAPI schema, fuzzed with schemathesis against real processes.

A real redis-server, a real Piper worker and a real gateway; schemathesis generates requests
from the schema the gateway serves at /openapi.json and checks every answer: no 5xx, a
documented status code and content type, headers and bodies that match the schema. The run is
bounded (few examples per operation, a derandomized seed) and the gateway must still serve a
normal request afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service, redis_server

MAX_TEXT_CHARS = 120
BATCH_MAX_ITEMS = 3
API_KEY = "fuzz-key"
# Examples per operation and mode; FUZZ_MAX_EXAMPLES raises it for a longer local run.
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningProcess]]:
    root = tmp_path_factory.mktemp("openapi-fuzz")
    worker_port, gateway_port = free_port(), free_port()
    with (
        redis_server(root / "redis") as store,
        python_service(
            "worker",
            {"WORKER_PORT": str(worker_port), "WORKER_THREADS": "1", "WORKER_MAX_QUEUE": "16"},
            port=worker_port,
            log_dir=root,
            timeout=180.0,
        ) as worker,
        python_service(
            "gateway",
            {
                "GATEWAY_PORT": str(gateway_port),
                "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{store.port}/0",
                "GATEWAY_WORKER_URL": worker.url,
                "GATEWAY_MAX_TEXT_CHARS": str(MAX_TEXT_CHARS),
                "GATEWAY_BATCH_MAX_ITEMS": str(BATCH_MAX_ITEMS),
            },
            port=gateway_port,
            log_dir=root,
        ) as gateway,
    ):
        keyed_port = free_port()
        with python_service(
            "gateway",
            {
                "GATEWAY_PORT": str(keyed_port),
                "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{store.port}/0",
                "GATEWAY_WORKER_URL": worker.url,
                "GATEWAY_API_KEYS": API_KEY,
            },
            port=keyed_port,
            log_dir=root,
        ) as keyed:
            yield {"redis": store, "worker": worker, "gateway": gateway, "keyed": keyed}


@pytest.fixture(scope="module")
def gateway_schema(services: dict[str, RunningProcess]) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{services['gateway'].url}/openapi.json")


def _operations() -> list[tuple[str, str]]:
    paths = create_app(GatewaySettings()).openapi()["paths"]
    return [(method.upper(), path) for path, item in paths.items() for method in item]


def _cases() -> list[tuple[str, str, GenerationMode]]:
    """Every operation with valid data; those with a body also with data that breaks it."""
    paths = create_app(GatewaySettings()).openapi()["paths"]
    cases = []
    for method, path in OPERATIONS:
        cases.append((method, path, GenerationMode.POSITIVE))
        if "requestBody" in paths[path][method.lower()]:
            cases.append((method, path, GenerationMode.NEGATIVE))
    return cases


OPERATIONS = _operations()


def test_schema_is_served_and_limited_by_settings(services: dict[str, RunningProcess]) -> None:
    served = httpx.get(f"{services['gateway'].url}/openapi.json", timeout=10).json()
    assert served["openapi"].startswith("3.1")
    assert "/metrics" not in served["paths"]
    body = served["components"]["schemas"]["SpeechBody"]["properties"]
    assert body["input"]["maxLength"] == MAX_TEXT_CHARS
    batch = served["components"]["schemas"]["BatchRequest"]["properties"]
    assert batch["items"]["maxItems"] == BATCH_MAX_ITEMS
    served_operations = [(m.upper(), p) for p, item in served["paths"].items() for m in item]
    assert sorted(served_operations) == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_public_api_conforms_to_its_schema(
    gateway_schema: schemathesis.BaseSchema,
    services: dict[str, RunningProcess],
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    """Valid requests (positive) and requests that break the schema (negative) for one
    operation; schemathesis shrinks a failure to its smallest example."""
    operation = gateway_schema[path][method]
    base_url = services["gateway"].url

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=120)

    check()


@pytest.fixture(scope="module")
def keyed_schema(services: dict[str, RunningProcess]) -> schemathesis.BaseSchema:
    """The schema of the gateway with API keys; reading it takes the key too."""
    return schemathesis.openapi.from_url(
        f"{services['keyed'].url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}
    )


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_api_keys_conform_to_the_schema(
    keyed_schema: schemathesis.BaseSchema,
    services: dict[str, RunningProcess],
    method: str,
    path: str,
) -> None:
    """A gateway with API keys declares Bearer auth; requests without the key get the
    documented 401 JSON error, and the health routes stay open."""
    operation = keyed_schema[path][method]
    secured = "security" in operation.definition.raw
    assert secured == (path not in {"/healthz", "/livez", "/readyz"})
    statuses: set[int] = set()

    @given(case=operation.as_strategy())
    @settings(
        max_examples=5,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case[Any]) -> None:
        case.headers.pop("Authorization", None)
        response = case.call_and_validate(
            base_url=services["keyed"].url, checks=CHECKS, timeout=120
        )
        statuses.add(response.status_code)

    check()
    assert statuses == ({401} if secured else {200}), statuses


def test_gateway_still_serves_after_fuzzing(services: dict[str, RunningProcess]) -> None:
    text = "The service still speaks after the fuzzing."
    response = httpx.post(
        f"{services['gateway'].url}/v1/audio/speech",
        json={"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"},
        headers={"Cache-Control": "no-store"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    decoded = decode(response.content, "wav", 22050)
    assert decoded.sample_rate == 22050
    assert 0.15 * len(text.split()) <= decoded.duration <= len(text.split()) + 1.0
    assert decoded.rms > 0.01
    assert services["gateway"].process.poll() is None
    worker_metrics = httpx.get(f"{services['worker'].url}/metrics", timeout=10).text
    started = next(
        float(line.split()[1])
        for line in worker_metrics.splitlines()
        if line.startswith("worker_syntheses_started_total ")
    )
    assert started >= 10, "the fuzzing never reached the worker: the schema admits nothing valid"
