import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings, load_settings


def test_defaults_match_the_design() -> None:
    settings = GatewaySettings()
    assert settings.cache_ttl_s == 7 * 24 * 3600
    assert settings.cache_max_entry_bytes == 10 * 1024 * 1024
    assert settings.cache_budget_s == pytest.approx(0.1)
    assert settings.max_text_chars == 4096
    assert settings.api_keys == []
    assert {"cosyvoice2", "cosyvoice3", "piper"} <= set(settings.model_names)


def test_lists_and_voice_mapping_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "k1, k2")
    monkeypatch.setenv("GATEWAY_OPENAI_VOICES", "alloy=joe,echo=amy")
    monkeypatch.setenv("GATEWAY_MODEL_NAMES", "tts-1")
    settings = load_settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.openai_voices == {"alloy": "joe", "echo": "amy"}
    assert settings.model_names == ["tts-1"]


def test_misspelt_setting_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_ULR", "redis://x")
    with pytest.raises(ValueError, match="GATEWAY_REDIS_ULR"):
        load_settings()


def test_unknown_openai_voice_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_OPENAI_VOICES", "bogus=joe")
    with pytest.raises(ValidationError):
        load_settings()
