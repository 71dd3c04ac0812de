from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import WorkerSettings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORKER_PORT", "WORKER_ENGINE", "WORKER_LOG_JSON"):
        monkeypatch.delenv(name, raising=False)
    settings = WorkerSettings()
    assert settings.engine == "piper"
    assert settings.log_level == "WARNING"
    assert settings.log_json is False
    assert settings.max_text_chars == 4096
    assert settings.engine_kwargs() == {}


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_PORT", "9123")
    monkeypatch.setenv("WORKER_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("WORKER_LOG_JSON", "true")
    monkeypatch.setenv("WORKER_VOICES_DIR", "/voices")
    monkeypatch.setenv("WORKER_THREADS", "2")
    monkeypatch.setenv("WORKER_ENGINE_OPTIONS", '{"gain": 1.5}')
    settings = WorkerSettings()
    assert settings.port == 9123
    assert settings.max_concurrency == 3
    assert settings.log_json is True
    assert settings.engine_kwargs() == {"voices_dir": Path("/voices"), "threads": 2, "gain": 1.5}


def test_misspelt_variable_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MAX_CONCURENCY", "3")
    with pytest.raises(ValidationError, match="WORKER_MAX_CONCURENCY"):
        WorkerSettings()


def test_unknown_keyword_fails() -> None:
    with pytest.raises(ValidationError):
        WorkerSettings(max_concurency=3)  # type: ignore[call-arg]


def test_bad_values_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_MAX_CONCURRENCY", "0")
    with pytest.raises(ValidationError):
        WorkerSettings()
