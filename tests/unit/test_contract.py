import pytest

from contract.audio import AudioFormat, output_sample_rate
from contract.cache_key import CACHE_KEY_PREFIX, CanonicalRequest
from contract.errors import ErrorCode, ServiceError
from contract.requests import check_speed, check_text


def canonical(**overrides: object) -> CanonicalRequest:
    fields: dict[str, object] = {
        "text": "Hello world.",
        "instruction": None,
        "voice": "joe",
        "prompt_audio": None,
        "prompt_text": None,
        "speed": 1.0,
        "format": "wav",
        "engine": "piper",
        "model_version": "v1",
    }
    fields.update(overrides)
    return CanonicalRequest.build(**fields)  # type: ignore[arg-type]


def test_key_has_prefix_and_md5() -> None:
    key = canonical().cache_key()
    assert key.startswith(CACHE_KEY_PREFIX)
    assert len(key) == len(CACHE_KEY_PREFIX) + 32


def test_key_ignores_surrounding_space_and_unicode_composition() -> None:
    assert canonical(text="  Caf\u00e9.  ").cache_key() == canonical(text="Cafe\u0301.").cache_key()


@pytest.mark.parametrize(
    "change",
    [
        {"voice": "amy"},
        {"format": "mp3"},
        {"speed": 1.25},
        {"instruction": "Speak slowly."},
        {"prompt_audio": b"RIFF"},
        {"prompt_text": "transcript"},
        {"engine": "cosyvoice"},
        {"model_version": "v2"},
    ],
)
def test_every_field_changes_the_key(change: dict[str, object]) -> None:
    assert canonical(**change).cache_key() != canonical().cache_key()


def test_seed_collision_of_text_plus_instruction_is_gone() -> None:
    # MD5(text + instruction) made these two requests one key.
    first = canonical(text="Hello wor", instruction="ld. Calm")
    second = canonical(text="Hello world.", instruction="Calm")
    assert first.cache_key() != second.cache_key()


@pytest.mark.parametrize(
    ("text", "code"), [("   ", ErrorCode.TEXT_EMPTY), ("x" * 11, ErrorCode.TEXT_TOO_LONG)]
)
def test_text_checks(text: str, code: ErrorCode) -> None:
    with pytest.raises(ServiceError) as caught:
        check_text(text, max_chars=10)
    assert caught.value.code is code
    assert caught.value.status == 422


def test_speed_bounds() -> None:
    assert check_speed(0.25) == 0.25
    with pytest.raises(ServiceError) as caught:
        check_speed(4.5)
    assert caught.value.code is ErrorCode.SPEED_OUT_OF_RANGE


def test_output_rates() -> None:
    assert output_sample_rate(AudioFormat.PCM, 22050) == 24000
    assert output_sample_rate(AudioFormat.OPUS, 22050) == 24000
    assert output_sample_rate(AudioFormat.OPUS, 48000) == 48000
    assert output_sample_rate(AudioFormat.WAV, 22050) == 22050


@pytest.mark.parametrize("text", ["nul\u0000byte", "bell\u0007", "escape\u001b[31m"])
def test_control_characters_are_refused(text: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_text(text)
    assert caught.value.code is ErrorCode.TEXT_INVALID


def test_tabs_and_line_breaks_are_text() -> None:
    assert check_text("One.\n\tTwo.\r\nThree.") == "One.\n\tTwo.\r\nThree."
