"""A real `python -m worker` process serving the cosyvoice engine from a tiny model directory:
each mode streams decodable audio over HTTP, and bad prompts get a 4xx before any audio."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from testbed.cosyvoice_models import build_model_dir
from tests.support.processes import RunningProcess, free_port, python_service

TEXT = "Hello there, this is a streaming test of the speech engine today."


def _wav_bytes(seconds: float, rate: int, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wav = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 170 * t)
    buffer = io.BytesIO()
    sf.write(buffer, wav.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProcess]:
    root = tmp_path_factory.mktemp("cvw")
    model_dir = build_model_dir(root / "tiny", eos_bias=4.5)
    port = free_port()
    env = {"WORKER_PORT": str(port), "WORKER_ENGINE": "cosyvoice",
           "WORKER_MODEL_DIR": str(model_dir), "WORKER_DEVICE": "cpu"}
    with python_service("worker", env, port=port, log_dir=root, timeout=180.0) as running:
        yield running


def test_info_describes_the_model(worker: RunningProcess) -> None:
    info = httpx.get(f"{worker.url}/v1/info", timeout=10.0).json()
    assert info["engine"] == "cosyvoice"
    assert info["sample_rate"] == 24000
    assert set(info["modes"]) == {"sft", "zero_shot", "cross_lingual", "instruct2"}
    assert {v["id"] for v in info["voices"]} == {"中文女", "english_male"}


@pytest.mark.parametrize(
    "fields",
    [
        {"voice": "english_male"},
        {"prompt_audio": _wav_bytes(2.0, 16000), "prompt_text": "A short prompt transcript."},
        {"prompt_audio": _wav_bytes(2.0, 44100)},
        {"prompt_audio": _wav_bytes(2.0, 22050), "instruction": "Speak happily."},
        {"voice": "english_male", "instruction": "Speak slowly."},
    ],
    ids=["sft", "zero_shot", "cross_lingual", "instruct2", "instruct2_speaker"],
)
def test_each_mode_streams_over_http(worker: RunningProcess, fields: dict[str, Any]) -> None:
    body: dict[str, Any] = {"text": TEXT, "seed": 3, "format": "pcm_f32le"} | fields
    if "prompt_audio" in body:
        body["prompt_audio"] = base64.b64encode(body["prompt_audio"]).decode()
    parts = []
    with httpx.stream("POST", f"{worker.url}/v1/synthesize", json=body, timeout=120.0) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["X-Sample-Rate"] == "24000"
        parts.extend(r.iter_bytes())
    audio = np.frombuffer(b"".join(parts), dtype="<f4")
    seconds = audio.size / 24000
    assert 1.0 < seconds < 60.0
    assert np.all(np.isfinite(audio))
    assert float(np.sqrt(np.mean(audio**2))) > 1e-3


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"prompt_audio": _wav_bytes(0.2, 16000)}, 422, "prompt_too_short"),
        ({"prompt_audio": _wav_bytes(2.0, 16000, silent=True)}, 422, "prompt_silent"),
        ({"prompt_audio": _wav_bytes(2.0, 16000), "prompt_text": "words",
          "instruction": "be happy"}, 422, "instruction_unsupported"),
    ],
)
def test_bad_prompts_are_refused(
    worker: RunningProcess, fields: dict[str, Any], status: int, code: str
) -> None:
    body: dict[str, Any] = {"text": TEXT, "seed": 1} | fields
    body["prompt_audio"] = base64.b64encode(body["prompt_audio"]).decode()
    response = httpx.post(f"{worker.url}/v1/synthesize", json=body, timeout=60.0)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_model_dir_lacking_a_file_fails_start_up(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.support.processes import REPO_ROOT

    empty = tmp_path / "model"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "worker"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120, check=False,
        env={**os.environ, "WORKER_PORT": str(free_port()), "WORKER_ENGINE": "cosyvoice",
             "WORKER_MODEL_DIR": str(empty)},
    )
    assert result.returncode != 0
    assert "cosyvoice2.yaml" in result.stderr
