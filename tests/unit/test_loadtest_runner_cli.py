"""Argument validation of the benchmark runner: bad input exits 2 with a clear message."""

from __future__ import annotations

import httpx
import pytest

from loadtest.runner.__main__ import main
from loadtest.runner.cli import parse_options
from loadtest.runner.targets import Api, CachePolicy, TargetSpecError, parse_target
from loadtest.runner.texts import TextMode

URL = "url=http://127.0.0.1:9"


def _rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_target_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    err = _rejects([], capsys)
    assert "no target" in err
    assert "--target url=http://HOST:PORT" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "label=a"], "url=... is required"),
        (["--target", "url=ftp://x"], "must be http(s)://host"),
        (["--target", "url=http://x/v1/audio/speech"], "base URL"),
        (["--target", "url=http://x:99999"], "bad port"),
        (["--target", f"{URL},api=grpc"], "api='grpc' is not one of openai, seed, worker"),
        (["--target", f"{URL},texts=some"], "texts='some' is not one of"),
        (["--target", f"{URL},format=pcm_f32le"], "for api=openai"),
        (["--target", f"{URL},colour=red"], "unknown key 'colour'"),
        (["--target", f"{URL},url=http://y"], "given twice"),
        (["--target", f"{URL},label"], "not key=value"),
        (["--target", f"{URL},label=a", "--target", f"{URL},label=a"], "labels must differ"),
        (["--target", URL] * 5, "at most 4 targets"),
        (["--target", URL, "--concurrency", "1,x"], "integers separated by commas"),
        (["--target", URL, "--concurrency", ","], "at least one level"),
        (["--target", URL, "--concurrency", "0"], "--concurrency 0 is out of range"),
        (["--target", URL, "--concurrency", "2,2"], "repeats a level"),
        (["--target", URL, "--concurrency", "100000"], "out of range"),
        (["--target", URL, "--duration", "0"], "--duration 0.0 is out of range"),
        (["--target", URL, "--duration", "3601"], "--duration"),
        (["--target", URL, "--duration", "nan"], "--duration"),
        (["--target", URL, "--max-requests", "0"], "--max-requests"),
        (["--target", URL, "--max-requests", "1000001"], "--max-requests"),
        (["--target", URL, "--timeout", "-1"], "--timeout"),
        (["--target", URL, "--pool-size", "99"], "--pool-size"),
        (["--target", URL, "--repeat-ratio", "1.5"], "--repeat-ratio"),
        (["--target", URL, "--seed", "-1"], "--seed"),
        (["--target", URL, "--max-requests", "ten"], "invalid int value"),
    ],
)
def test_bad_parameters_are_rejected(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _rejects(argv, capsys)


def test_good_arguments_build_a_bounded_plan() -> None:
    options = parse_options(
        [
            "--target",
            "label=nginx,url=http://127.0.0.1:8080/,texts=repeat,cache=bypass",
            "--target",
            "label=worker,url=http://127.0.0.1:9100,api=worker,format=wav,voice=joe",
            "--concurrency",
            "4,1,2",
            "--duration",
            "5",
            "--max-requests",
            "50",
        ]
    )
    plan = options.plan
    assert plan.concurrency == (1, 2, 4)
    assert plan.duration_s == 5.0
    assert plan.max_requests == 50
    nginx, worker = plan.targets
    assert nginx.url == "http://127.0.0.1:8080"
    assert nginx.api is Api.OPENAI
    assert nginx.format == "pcm"
    assert nginx.texts is TextMode.REPEAT
    assert nginx.cache is CachePolicy.BYPASS
    assert worker.api is Api.WORKER
    assert worker.format == "wav"
    assert worker.path == "/v1/synthesize"
    assert options.out.parent.name == "bench-results"


def test_request_bodies_per_api() -> None:
    openai = parse_target("url=http://h,cache=bypass,voice=echo", 0)
    kwargs = openai.request_kwargs("Hello.", api_key=None)
    assert kwargs["url"] == "http://h/v1/audio/speech"
    assert kwargs["json"] == {
        "model": "tts-1",
        "input": "Hello.",
        "voice": "echo",
        "response_format": "pcm",
    }
    assert kwargs["headers"] == {"Cache-Control": "no-cache"}
    seed = parse_target("url=http://h,api=seed", 1).request_kwargs("Hi.", api_key="s")
    assert seed["url"] == "http://h/synthesize"
    assert seed["files"] == {"text": (None, "Hi."), "format": (None, "pcm_f32le")}
    encoded = httpx.Request("POST", seed["url"], files=seed["files"])
    assert encoded.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert seed["headers"] == {"Authorization": "Bearer s"}
    worker = parse_target("url=http://h,api=worker", 2).request_kwargs("Hi.", api_key=None)
    assert worker["json"] == {"text": "Hi.", "format": "pcm_f32le"}
    with pytest.raises(TargetSpecError):
        parse_target("", 0)


def test_unreachable_target_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "label=gone,url=http://127.0.0.1:9", "--duration", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "target 'gone'" in err
    assert "unreachable" in err
