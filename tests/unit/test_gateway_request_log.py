import logging

import pytest

from contract.requests import SynthesisRequest
from gateway.request_log import RequestLog

REQUEST = SynthesisRequest(text="Private words.", voice="joe")


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.requests"]


def test_off_by_default_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    RequestLog(enabled=False, redact_text=False).record(
        request_id="r1", cache="MISS", key="tts:v1:k", synthesis=REQUEST
    )
    assert records(caplog) == []


@pytest.mark.parametrize("redact", [False, True])
def test_text_is_logged_only_without_redaction(
    caplog: pytest.LogCaptureFixture, redact: bool
) -> None:
    RequestLog(enabled=True, redact_text=redact).record(
        request_id="r1", cache="MISS", key="tts:v1:k", synthesis=REQUEST
    )
    [line] = records(caplog)
    assert '"request_id": "r1"' in line
    assert '"chars": 14' in line
    assert ("Private words." in line) is not redact
    assert ('"text_sha256"' in line) is redact
