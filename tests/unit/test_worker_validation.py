from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile

from contract.errors import ErrorCode, ServiceError
from contract.requests import SynthesisRequest, default_seed
from worker.engines.base import Capabilities, VoiceInfo
from worker.validation import parse_body, validate

PIPER_LIKE = Capabilities(
    engine="fake",
    model="fake-model",
    model_version="1",
    sample_rate=22050,
    modes=("sft",),
    languages=("en",),
    voices=(
        VoiceInfo(id="joe", name="Joe", language="en"),
        VoiceInfo(id="amy", name="Amy", language="en"),
    ),
    default_voice="joe",
    supports_cloning=False,
    supports_instructions=False,
)
CLONING = PIPER_LIKE.model_copy(update={"supports_cloning": True, "supports_instructions": True})


def check(body: dict[str, object], capabilities: Capabilities = PIPER_LIKE) -> ErrorCode:
    with pytest.raises(ServiceError) as error:
        validate(parse_body(json.dumps(body).encode()), capabilities, max_text_chars=100)
    return error.value.code


def test_valid_request_resolves_voice_text_and_seed() -> None:
    request = parse_body(b'{"text": "  Hello.  ", "format": "wav", "speed": 1.5}')
    validated = validate(request, PIPER_LIKE, max_text_chars=100)
    assert validated.engine_request.text == "Hello."
    assert validated.engine_request.voice == "joe"
    assert validated.engine_request.speed == 1.5
    assert validated.engine_request.seed == default_seed(request)
    assert validated.audio_format.value == "wav"


def test_explicit_seed_and_voice_are_kept() -> None:
    request = SynthesisRequest(text="Hi.", voice="amy", seed=42)
    validated = validate(request, PIPER_LIKE, max_text_chars=100)
    assert (validated.engine_request.voice, validated.engine_request.seed) == ("amy", 42)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"text": ""}, ErrorCode.TEXT_EMPTY),
        ({"text": "   "}, ErrorCode.TEXT_EMPTY),
        ({"text": "x" * 101}, ErrorCode.TEXT_TOO_LONG),
        ({"text": "Hi.", "voice": "zed"}, ErrorCode.UNKNOWN_VOICE),
        ({"text": "Hi.", "speed": 0.2}, ErrorCode.SPEED_OUT_OF_RANGE),
        ({"text": "Hi.", "speed": 4.01}, ErrorCode.SPEED_OUT_OF_RANGE),
        ({"text": "Hi.", "format": "aiff"}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"text": "Hi.", "format": 3}, ErrorCode.UNSUPPORTED_FORMAT),
        ({"text": "Hi.", "instruction": "Whisper."}, ErrorCode.INSTRUCTION_UNSUPPORTED),
        ({"text": "Hi.", "prompt_text": "Words."}, ErrorCode.PROMPT_TEXT_WITHOUT_AUDIO),
        ({"text": "..."}, ErrorCode.TEXT_EMPTY),
        ({"text": "Hi.", "prompt_audio": "AAAA"}, ErrorCode.PROMPT_UNSUPPORTED),
        ({"text": "Hi.", "seed": -1}, ErrorCode.INVALID_REQUEST),
        ({"text": "Hi.", "speed": "fast"}, ErrorCode.INVALID_REQUEST),
        ({"txt": "Hi."}, ErrorCode.INVALID_REQUEST),
    ],
)
def test_each_bad_request_has_its_code(body: dict[str, object], code: ErrorCode) -> None:
    assert check(body) is code


def test_blank_instruction_counts_as_absent() -> None:
    request = SynthesisRequest(text="Hi.", instruction="  ", prompt_text="")
    assert validate(request, PIPER_LIKE, max_text_chars=100).engine_request.instruction is None


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe", b"[1,"])
def test_malformed_json(body: bytes) -> None:
    with pytest.raises(ServiceError) as error:
        parse_body(body)
    assert error.value.code is ErrorCode.INVALID_JSON
    assert error.value.status == 400


def test_non_object_json_is_invalid_request() -> None:
    with pytest.raises(ServiceError) as error:
        parse_body(b"[1, 2]")
    assert error.value.code is ErrorCode.INVALID_REQUEST


def test_cloning_engine_decodes_prompt_audio() -> None:
    buffer = io.BytesIO()
    stereo = np.full((40000, 2), 0.25, dtype=np.float32)
    soundfile.write(buffer, stereo, 16000, format="WAV", subtype="FLOAT")
    prompt = base64.b64encode(buffer.getvalue()).decode()
    request = parse_body(json.dumps({"text": "Hi.", "prompt_audio": prompt}).encode())
    engine_request = validate(request, CLONING, max_text_chars=100).engine_request
    assert engine_request.prompt_sample_rate == 16000
    assert engine_request.prompt_audio is not None
    assert engine_request.prompt_audio.shape == (40000,)


def test_cloning_engine_rejects_non_audio_prompt() -> None:
    prompt = base64.b64encode(b"this is not audio at all").decode()
    assert check({"text": "Hi.", "prompt_audio": prompt}, CLONING) is ErrorCode.PROMPT_NOT_AUDIO
