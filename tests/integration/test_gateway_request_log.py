"""Request logs through real processes: one line per request, and no text with privacy on."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.integration.test_gateway_integration import check_speech, gateway, speech, worker
from tests.support.processes import RunningProcess, redis_server

SECRET = "My account number is 4242, please read it back."


def request_lines(front: RunningProcess) -> list[dict[str, object]]:
    marker = "synthesis request "
    return [
        json.loads(line.split(marker, 1)[1])
        for line in front.log().splitlines()
        if marker in line
    ]


def test_request_logs_leave_out_the_text_when_redacted(tmp_path: Path) -> None:
    with (
        redis_server(tmp_path / "redis") as store,
        worker(tmp_path) as synth,
        gateway(tmp_path, store.port, synth.url, GATEWAY_LOG_REQUESTS="true") as plain,
        gateway(
            tmp_path,
            store.port,
            synth.url,
            GATEWAY_LOG_REQUESTS="true",
            GATEWAY_LOG_REDACT_TEXT="true",
        ) as private,
    ):
        for front in (plain, private):
            with httpx.Client(base_url=front.url) as client:
                first = speech(client, input=SECRET)
                assert first.status_code == 200
                check_speech(first.content, "wav", 22050, SECRET)
                assert speech(client, input=SECRET).headers["X-Cache"] == "HIT"

        plain_lines = request_lines(plain)
        assert [line["cache"] for line in plain_lines] == ["MISS", "HIT"]
        assert all(line["text"] == SECRET for line in plain_lines)

        private_lines = request_lines(private)
        assert [line["cache"] for line in private_lines] == ["HIT", "HIT"]
        assert all(line["chars"] == len(SECRET) and "text" not in line for line in private_lines)
        assert len({line["text_sha256"] for line in private_lines}) == 1
        assert "4242" not in private.log()
