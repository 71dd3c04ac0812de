"""A real `python -m worker` process serving a tiny random-weight CosyVoice3 directory under the
`cosyvoice` engine name: every mode streams decodable audio over HTTP, registered voices work,
bad input gets its 4xx code before any audio, and the worker keeps serving afterwards. In
process: the directory's yaml picks the model, each mode's prompt text and the capacity
arithmetic. A directory without speakers serves the cloning modes only."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from testbed.cosyvoice3_models import build_model_dir
from tests.support.audio import decode
from tests.support.processes import RunningProcess, free_port, python_service
from worker.engines import create_engine
from worker.engines.base import EngineRequest
from worker.engines.cosyvoice.capacity import WORKING_SHARE
from worker.engines.cosyvoice.config import ModelDirError
from worker.engines.cosyvoice.decode import SlotPool
from worker.engines.cosyvoice.frontend import VoicePrompt
from worker.engines.cosyvoice.scheduler import DONE
from worker.engines.cosyvoice.v3_config import check_v3_model_dir
from worker.engines.cosyvoice.v3_engine import CosyVoice3Engine
from worker.engines.cosyvoice.v3_llm import CosyVoice3LM
from worker.engines.cosyvoice.v3_pipeline import V3AudioStage

TEXT = "Hello there, this is a streaming test of the speech engine today."
SPEAKERS = {"中文女", "english_male"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wav(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 170 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32)


def _wav_b64(seconds: float = 2.0, rate: int = 16000) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, _wav(seconds, rate), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cv3w") / "tiny", seed=4)


@contextmanager
def _worker_on(model_dir: Path, log_dir: Path) -> Iterator[RunningProcess]:
    port = free_port()
    env = {"WORKER_PORT": str(port), "WORKER_ENGINE": "cosyvoice",
           "WORKER_MODEL_DIR": str(model_dir), "WORKER_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    with python_service("worker", env, port=port, log_dir=log_dir, timeout=180.0) as running:
        yield running


@pytest.fixture(scope="module")
def worker(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningProcess]:
    with _worker_on(model_dir, tmp_path_factory.mktemp("cv3log")) as running:
        yield running


def _speak(worker: RunningProcess, **fields: Any) -> np.ndarray:
    """The audio of a streamed synthesis (WAV, decoded), after checking it is speech-like."""
    body: dict[str, Any] = {"text": TEXT, "seed": 3, "format": "wav"} | fields
    with httpx.stream("POST", f"{worker.url}/v1/synthesize", json=body, timeout=120.0) as r:
        assert r.status_code == 200, r.read()
        data = b"".join(r.iter_bytes())
    audio = decode(data, "wav")
    assert audio.sample_rate == 24000
    assert 0.5 < audio.duration < 60.0
    assert np.all(np.isfinite(audio.samples))
    assert audio.rms > 1e-3
    return audio.samples


def _refused(worker: RunningProcess, body: dict[str, Any]) -> tuple[int, str]:
    response = httpx.post(f"{worker.url}/v1/synthesize", json=body, timeout=60.0)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return response.status_code, response.json()["error"]["code"]


def test_info_describes_cosyvoice3(worker: RunningProcess) -> None:
    info = httpx.get(f"{worker.url}/v1/info", timeout=10.0).json()
    assert info["engine"] == "cosyvoice"
    assert info["model"] == "tiny"
    assert info["model_version"]  # the engine's digest, plus the worker's loudness level
    assert info["sample_rate"] == 24000
    assert set(info["modes"]) == {"sft", "zero_shot", "cross_lingual", "instruct2"}
    assert {v["id"] for v in info["voices"]} == SPEAKERS
    assert info["default_voice"] in SPEAKERS
    assert info["supports_cloning"]
    assert info["supports_instructions"]
    assert info["speed_range"] == [1.0, 1.0]
    assert info["max_streams"] == 8


@pytest.mark.parametrize(
    "fields",
    [
        {"voice": "english_male"},
        {"prompt_audio": _wav_b64(), "prompt_text": "A short prompt transcript."},
        {"prompt_audio": _wav_b64(2.0, 44100)},
        {"prompt_audio": _wav_b64(2.0, 22050), "instruction": "Speak happily."},
        {"voice": "english_male", "instruction": "Speak slowly."},
    ],
    ids=["sft", "zero_shot", "cross_lingual", "instruct2", "instruct2_speaker"],
)
def test_each_mode_streams_over_http(worker: RunningProcess, fields: dict[str, Any]) -> None:
    _speak(worker, **fields)


def test_the_same_request_gives_the_same_audio(worker: RunningProcess) -> None:
    fields = {"prompt_audio": _wav_b64(), "prompt_text": "A short prompt transcript.", "seed": 9}
    assert np.array_equal(_speak(worker, **fields), _speak(worker, **fields))


def test_registered_voice_features_are_served_and_versioned(worker: RunningProcess) -> None:
    computed = httpx.post(
        f"{worker.url}/v1/voices/features",
        json={"prompt_audio": _wav_b64(3.0), "prompt_text": "A short prompt transcript."},
        timeout=120.0,
    )
    assert computed.status_code == 200, computed.text
    assert computed.headers["X-Engine"] == "cosyvoice"
    features = computed.content
    prompt = VoicePrompt.from_bytes(features)
    assert prompt.speech_tokens.size(1) == 75  # 25 tokens a second
    assert prompt.mel.shape == (1, 150, 80)
    voice = {"voice": "my_voice", "voice_features": base64.b64encode(features).decode()}
    _speak(worker, **voice)
    older = replace(prompt, model_version="0123456789ab").to_bytes()
    stale = {"text": TEXT, "voice": "my_voice",
             "voice_features": base64.b64encode(older).decode()}
    assert _refused(worker, stale) == (422, "voice_outdated")


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"voice": "nobody"}, 422, "unknown_voice"),
        ({"prompt_audio": _wav_b64(), "prompt_text": "words", "instruction": "be happy"},
         422, "instruction_unsupported"),
        ({"text": "   "}, 422, "text_empty"),
        ({"text": "~ ~"}, 422, "text_empty"),  # a symbol, but nothing left to say once normalised
        ({"speed": 1.5}, 422, "speed_out_of_range"),
        ({"prompt_audio": _wav_b64(0.2)}, 422, "prompt_too_short"),
    ],
    ids=["unknown_voice", "instruction_and_transcript", "blank", "nothing_to_say", "speed",
         "short_prompt"],
)
def test_bad_input_is_refused_before_audio_and_the_worker_carries_on(
    worker: RunningProcess, fields: dict[str, Any], status: int, code: str
) -> None:
    body: dict[str, Any] = {"text": TEXT, "seed": 1} | fields
    assert _refused(worker, body) == (status, code)
    _speak(worker, voice="english_male", text="Still here.")


def test_the_directory_picks_the_model(model_dir: Path, tmp_path: Path) -> None:
    assert isinstance(create_engine("cosyvoice", model_dir=str(model_dir)), CosyVoice3Engine)
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "llm.pt").touch()
    with pytest.raises(ModelDirError, match=r"cosyvoice2\.yaml.*cosyvoice3\.yaml"):
        create_engine("cosyvoice", model_dir=str(neither)).load()
    with pytest.raises(ValueError, match="flow_steps"):
        create_engine("cosyvoice", model_dir=str(model_dir), flow_steps=4)
    with pytest.raises(ValueError, match=r"later_chunk_hops must be 1\.\.4"):
        create_engine("cosyvoice", model_dir=str(model_dir), later_chunk_hops=5)


@pytest.mark.parametrize("missing", ["speech_tokenizer_v3.onnx", "campplus.onnx"])
def test_a_missing_file_names_itself(model_dir: Path, tmp_path: Path, missing: str) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in model_dir.iterdir():
        if entry.name != missing:
            (broken / entry.name).symlink_to(entry)
    with pytest.raises(ModelDirError, match=missing.replace(".", r"\.")):
        create_engine("cosyvoice", model_dir=str(broken)).load()


def test_without_spk2info_only_the_cloning_modes_are_served(tmp_path: Path) -> None:
    bare = build_model_dir(tmp_path / "bare", seed=4, speakers=False)
    # Readiness means warm-up spoke: it clones a synthetic recording, having no speaker.
    with _worker_on(bare, tmp_path) as worker:
        info = httpx.get(f"{worker.url}/v1/info", timeout=10.0).json()
        assert info["modes"] == ["zero_shot", "cross_lingual", "instruct2"]
        assert info["voices"] == []
        assert info["default_voice"] == ""
        _speak(worker, prompt_audio=_wav_b64())  # no voice named, none needed
        _speak(worker, prompt_audio=_wav_b64(), prompt_text="A short prompt transcript.")
        refused = _refused(worker, {"text": TEXT, "voice": "english_male"})
        assert refused == (422, "unknown_voice")
        assert _refused(worker, {"text": TEXT}) == (422, "unknown_voice")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[CosyVoice3Engine]:
    built = create_engine("cosyvoice", model_dir=str(model_dir))
    assert isinstance(built, CosyVoice3Engine)
    built.load()
    yield built
    built._require()[0].stop()


@pytest.mark.parametrize(
    ("fields", "head", "prompt_tokens"),
    [
        ({"voice": "english_male"}, "You are a helpful assistant.<|endofprompt|>", False),
        ({"prompt_text": "A short prompt transcript."},
         "You are a helpful assistant.<|endofprompt|>A short prompt transcript.", True),
        ({}, "You are a helpful assistant.<|endofprompt|>", False),
        ({"instruction": "Speak happily."},
         "You are a helpful assistant. Speak happily.<|endofprompt|>", False),
        ({"voice": "english_male", "instruction": "Speak slowly."},
         "You are a helpful assistant. Speak slowly.<|endofprompt|>", False),
    ],
    ids=["sft", "zero_shot", "cross_lingual", "instruct2", "instruct2_speaker"],
)
def test_each_mode_gives_the_llm_the_released_prompt_text(
    engine: CosyVoice3Engine, fields: dict[str, Any], head: str, prompt_tokens: bool
) -> None:
    recording = {} if "voice" in fields else {"prompt_audio": _wav(), "prompt_sample_rate": 16000}
    given = {"voice": ""} | recording | fields
    request = EngineRequest(text="Good morning.", speed=1.0, seed=1, **given)
    (utt,) = engine.plan(request)
    tokenizer = engine._require()[1].tokenizer
    assert tokenizer.decode(utt.text_ids) == head + "Good morning."
    assert utt.tts_token_count == len(tokenizer("Good morning.")["input_ids"])
    assert (utt.llm_prompt_tokens.size(1) > 0) == prompt_tokens
    assert (utt.flow_prompt_tokens.size(1) > 0) == ("prompt_audio" in recording)


def test_capacity_counts_a_streams_flow_keys_and_values(
    engine: CosyVoice3Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = engine._audio
    assert isinstance(audio, V3AudioStage)
    dit = audio.flow.cfg.dit
    per_frame = engine._flow_frame_bytes(audio.flow)
    assert per_frame == 10 * dit.depth * 2 * 2 * dit.heads * dit.dim_head * 4  # float32
    llm = engine._llm
    assert isinstance(llm, CosyVoice3LM)
    # 15 s of flow state: 750 frames, in whole chunks of the 50-frame grid
    cost = SlotPool.row_bytes(llm.backbone, engine.max_positions) + 750 * per_frame
    # 3 streams once 15% is kept back for working tensors and 5% for prompt prefixes
    free, total = 15 * 10**7 + 5 * 10**7 + 3 * cost + 1000, 10**9
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda device=None: (free, total))
    config = check_v3_model_dir(engine.model_dir)
    assert engine._streams_that_fit(llm, audio.flow, config) == 3


async def test_capacity_is_lowered_where_warm_up_left_too_little_memory(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sized at load, the capacity is checked again once warm-up has made the flow's store of
    keys and values in what the driver has free after the other graphs (the device's memory
    stubbed): streams the store cannot hold are taken off what the engine states and admits,
    and it serves on within the rest. A request holds its place until all its audio is
    spoken, not only while it decodes: its flow state lives that long."""
    built = create_engine("cosyvoice", model_dir=str(model_dir), max_streams=8)
    assert isinstance(built, CosyVoice3Engine)
    built.load()
    scheduler = built._require()[0]
    audio = built._audio
    assert isinstance(audio, V3AudioStage)
    per_frame = built._flow_frame_bytes(audio.flow)
    monkeypatch.setattr(built, "_size_streams_to_memory", True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    page = built._page_bytes(audio.flow)
    assert page * 10 == 50 * per_frame  # a page: one Euler step of a grid chunk
    stream_pages = built._stream_pages(audio.flow)
    assert stream_pages == 10 * 15  # 15 s: 15 chunks of the grid for each of 10 steps
    total = 10**12
    store = (2 * stream_pages + built._cache_pages(page) + 1) * page  # 2 streams, cache, scratch
    monkeypatch.setattr("torch.cuda.mem_get_info",
                        lambda device=None: (int(WORKING_SHARE * total) + store + 10, total))
    built._make_flow_pages(audio.flow)
    built._fit_streams_after_warm_up(scheduler)
    assert built.max_streams == built.capabilities().max_streams == scheduler.capacity == 2
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda device=None: (total, total))
    built._fit_streams_after_warm_up(scheduler)
    assert built.max_streams == 2  # never raised past what load allocated rows for
    scheduler.limit_rows(1)
    in_flight: list[int] = []  # after each admission: admitted jobs not yet all spoken
    admit = scheduler._admit

    def admit_and_count() -> Any:
        admitted = admit()
        in_flight.append(sum(j.admitted and j.live for j in scheduler._speaking))
        return admitted

    monkeypatch.setattr(scheduler, "_admit", admit_and_count)
    scheduler.start()
    try:
        async def speak(seed: int) -> np.ndarray:
            """The job's audio, read to its end without cancelling it: a job all spoken must
            itself wake the decoding loop that waits for its place."""
            request = EngineRequest(text="Good morning.", voice="english_male", speed=1.0,
                                    seed=seed)
            job = scheduler.submit(built.plan(request), None)
            chunks = []
            while (item := await asyncio.wait_for(job.queue.get(), 60)) is not DONE:
                assert isinstance(item, np.ndarray)
                chunks.append(item)
            return np.concatenate(chunks)

        spoken = await asyncio.gather(speak(1), speak(2))
        assert all(s.size > 0 and float(np.abs(s).max()) > 1e-4 for s in spoken)
        assert scheduler._free_slots == [0]
        # a job decoded but still speaking keeps its place: the next waits for its audio
        assert max(in_flight) == 1
    finally:
        scheduler.stop()
