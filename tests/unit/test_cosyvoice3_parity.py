"""CosyVoice3 modules against upstream's outputs on the same tiny random-weight model.

The references (tests/data/cosyvoice3/, see its README) were computed by upstream's own code on
the directory `build_model_dir(seed=0)` writes; the weight digests stored with them show first
that this directory is still the one they were made from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from testbed.cosyvoice3_models import build_model_dir, weights_digest
from worker.engines.cosyvoice.v3_config import check_v3_model_dir
from worker.engines.cosyvoice.v3_flow import CosyVoice3Flow, load_v3_flow
from worker.engines.cosyvoice.v3_hift import CausalHiFT, HiFTNoise, load_v3_hift
from worker.engines.cosyvoice.v3_llm import load_v3_llm

DATA = Path(__file__).parents[1] / "data" / "cosyvoice3"
# Measured: 0 for the LLM and flow (same float32 operations), ~1e-7 for the vocoder.
LLM_TOL = 1e-5
FLOW_TOL = 1e-4
HIFT_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def meta() -> dict[str, object]:
    loaded: dict[str, object] = json.loads((DATA / "reference.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "reference.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, meta: dict[str, object]) -> Path:
    seed = int(str(meta["model_seed"]))
    root = build_model_dir(tmp_path_factory.mktemp("cv3") / "tiny", seed=seed)
    assert weights_digest(root) == meta["weights_sha256"], (
        "the tiny model generator no longer writes the weights the references were made from; "
        "regenerate them with testbed/cosyvoice3_reference.py (tests/data/cosyvoice3/README.md)")
    return root


@pytest.fixture(scope="module")
def flow(model_dir: Path) -> CosyVoice3Flow:
    return load_v3_flow(model_dir, check_v3_model_dir(model_dir).flow)


@pytest.fixture(scope="module")
def hift(model_dir: Path) -> CausalHiFT:
    cfg = check_v3_model_dir(model_dir)
    return load_v3_hift(model_dir, cfg.hift, cfg.conv_pre_look_right)


def _t(ref: dict[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(ref[key])


def test_llm_teacher_forced_logits_match(model_dir: Path, ref: dict[str, np.ndarray]) -> None:
    cfg = check_v3_model_dir(model_dir)
    llm = load_v3_llm(model_dir, cfg.llm)
    text = _t(ref, "text")
    llm.end_of_prompt = int(text[0, 3])  # the tiny vocabulary has no <|endofprompt|>
    got = llm.teacher_forced(llm.build_input(text, _t(ref, "prompt_speech")), _t(ref, "target"))
    want = ref["llm_logits"]
    assert got.shape == want.shape == (1, 9, 6761)
    assert np.abs(got.numpy() - want).max() <= LLM_TOL


@pytest.mark.parametrize(
    ("key", "streaming", "final", "tokens"),
    [("flow_streaming", True, True, 60), ("flow_full", False, True, 60),
     ("flow_first_chunk", True, False, 33)],
)
def test_flow_mel_matches(
    flow: CosyVoice3Flow, ref: dict[str, np.ndarray], key: str, streaming: bool, final: bool,
    tokens: int,
) -> None:
    mel = flow.whole([_t(ref, "prompt_tokens")[0]], [_t(ref, "tokens")[0, :tokens]],
                     [_t(ref, "prompt_mel")[0]], [_t(ref, "embedding")[0]],
                     streaming=streaming, final=final)[0]
    assert mel.shape == ref[key].shape
    assert np.abs(mel.numpy() - ref[key]).max() <= FLOW_TOL


def test_streaming_and_full_attention_differ(ref: dict[str, np.ndarray]) -> None:
    """The two flow references are distinct, so each parity test checks its own mask."""
    assert np.abs(ref["flow_streaming"] - ref["flow_full"]).max() > 100 * FLOW_TOL


@pytest.mark.parametrize(("key", "final"), [("hift_final", True), ("hift_partial", False)])
def test_hift_waveform_matches(
    hift: CausalHiFT, ref: dict[str, np.ndarray], meta: dict[str, object], key: str,
    final: bool,
) -> None:
    noise = HiFTNoise.draw(int(str(meta["noise_seed"])), int(str(meta["noise_samples"])))
    wav = hift(_t(ref, "flow_streaming").unsqueeze(0), noise, final=final)[0]
    assert wav.shape == ref[key].shape
    assert np.abs(wav.numpy() - ref[key]).max() <= HIFT_TOL
    assert np.abs(ref[key]).max() > 1e-3  # not a silent reference


def test_released_noise_is_the_buffer_upstreams_loader_draws(
    model_dir: Path, meta: dict[str, object]
) -> None:
    cfg = check_v3_model_dir(model_dir)
    before = torch.random.get_rng_state()
    noise = HiFTNoise.released(cfg.flow, cfg.hift, int(str(meta["noise_samples"])))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's state is kept
    digest = hashlib.sha256(noise.sines.contiguous().numpy().tobytes()).hexdigest()
    assert digest == meta["released_noise_sha256"]
