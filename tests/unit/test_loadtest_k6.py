"""The k6 scenarios: valid ES modules, sane when dry-run under node, and speaking only the
endpoints and fields that the gateway's OpenAPI schema declares."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from loadtest.runner.texts import PHRASES

REPO = Path(__file__).resolve().parents[2]
K6_DIR = REPO / "loadtest" / "k6"
SCRIPTS = sorted(p.name for p in K6_DIR.glob("*.js"))
ALL_JS = sorted(p for p in K6_DIR.rglob("*.js") if "harness" not in p.parts)
NODE = shutil.which("node")
BASE_URL = "http://127.0.0.1:18080"
ITERATIONS = 4

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def test_every_scenario_is_there() -> None:
    assert set(SCRIPTS) == {"hits.js", "misses.js", "mix.js", "streaming.js", "multipart.js"}


@needs_node
@pytest.mark.parametrize("path", ALL_JS, ids=lambda p: str(p.relative_to(K6_DIR)))
def test_script_is_a_valid_es_module(path: Path) -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--input-type=module", "--check"],
        input=path.read_bytes(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()


@functools.cache
def dry_run(script: str, api_key: str = "", iterations: int = ITERATIONS) -> dict[str, Any]:
    """Run `script` under node with recording stubs for k6's modules (no request is sent).

    Returns the harness's JSON: `options`, `requests` (method, url, body, headers, tags),
    `setup_requests` (how many of them setup() sent), `checks` and `metrics`.
    """
    assert NODE is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K6_", "BASE_URL"))}
    env.update({"BASE_URL": BASE_URL + "/", "API_KEY": api_key})
    result = subprocess.run(
        [NODE, str(K6_DIR / "harness" / "dry_run.mjs"), str(K6_DIR / script), str(iterations)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_a_broken_script_fails_the_dry_run(tmp_path: Path) -> None:
    if NODE is None:
        pytest.skip("node is not installed")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    broken = tmp_path / "broken.js"
    broken.write_text("import http from 'k6/http';\nexport default function () { nope(); }\n")
    result = subprocess.run(
        [NODE, str(K6_DIR / "harness" / "dry_run.mjs"), str(broken)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert b"nope is not defined" in result.stderr


@needs_node
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_sends_requests_and_passes_its_checks(script: str) -> None:
    doc = dry_run(script)
    measured = [r for r in doc["requests"] if r["tags"].get("phase") == "measure"]
    assert len(measured) == ITERATIONS
    for request in doc["requests"]:
        assert request["url"].startswith(BASE_URL + "/"), request["url"]
        assert "//" not in urlsplit(request["url"]).path
    assert doc["checks"], "the script checks nothing"
    for name, counts in doc["checks"].items():
        assert counts["fail"] == 0, f"check {name!r} failed in the dry run"
        assert counts["pass"] == ITERATIONS


@needs_node
@pytest.mark.parametrize("script", SCRIPTS)
def test_thresholds_bound_error_rate_p95_and_p99(script: str) -> None:
    options = dry_run(script)["options"]
    thresholds: dict[str, list[str]] = options["thresholds"]
    errors = thresholds["http_req_failed{phase:measure}"]
    assert any(t.startswith("rate<") for t in errors)
    latency = thresholds["http_req_duration{phase:measure}"]
    assert any(t.startswith("p(95)<") for t in latency)
    assert any(t.startswith("p(99)<") for t in latency)
    (scenario,) = options["scenarios"].values()
    assert scenario["vus"] >= 1
    assert scenario["duration"]


@needs_node
def test_scenarios_do_what_their_names_say() -> None:
    hits = dry_run("hits.js")
    assert hits["setup_requests"] > 0
    assert hits["metrics"]["cache_hits"] == [1] * ITERATIONS
    misses = dry_run("misses.js")
    texts = [r["body"]["fields"]["input"] for r in misses["requests"]]
    assert len(set(texts)) == len(texts)
    streaming = dry_run("streaming.js")
    assert all(r["headers"]["Cache-Control"] == "no-cache" for r in streaming["requests"])
    assert "http_req_waiting" in streaming["options"]["thresholds"]
    multipart = dry_run("multipart.js")
    uploads = [r for r in multipart["requests"] if r["body"]["kind"] == "multipart"]
    assert len(uploads) == ITERATIONS
    assert all(r["body"]["files"] == ["prompt_audio"] for r in uploads)
    assert all(r["body"]["fields"]["prompt_audio"]["bytes"] > 44 for r in uploads)
    assert all(r["expected_statuses"] == [422] for r in uploads)


@needs_node
def test_api_key_is_sent_as_bearer_token() -> None:
    doc = dry_run("hits.js", api_key="secret")
    assert all(r["headers"]["Authorization"] == "Bearer secret" for r in doc["requests"])


def test_phrases_are_the_same_in_k6_wrk_and_the_runner() -> None:
    """The three tools repeat the same phrases, so a cache primed by one serves the others."""
    js = (K6_DIR / "lib" / "common.js").read_text()
    js_block = js.split("export const PHRASES = [")[1].split("];")[0]
    js_phrases = [p.replace("\\'", "'") for p in re.findall(r"'((?:[^'\\]|\\.)*)'", js_block)]
    lua = (REPO / "loadtest" / "wrk" / "common.lua").read_text()
    lua_block = lua.split("M.phrases = {")[1].split("}")[0]
    lua_phrases = re.findall(r'"([^"]*)"', lua_block)
    assert len(js_phrases) == 8
    assert js_phrases == lua_phrases == list(PHRASES[: len(js_phrases)])
