"""Writes the CosyVoice3 parity references: upstream's outputs on the tiny model of a fixed seed.

No package on PyPI ships upstream's CosyVoice3 LLM and DiT flow, so the references are made once
from upstream's public source, kept outside this repository, and stored as small arrays under
`tests/data/cosyvoice3/`. This script holds no upstream code: it imports upstream's `cosyvoice`
package from the directory given on the command line (with its extra dependencies, e.g.
`x_transformers` 2.11.24 and `einops`, from `--deps`), builds the tiny model directory with
`testbed.cosyvoice3_models.build_model_dir`, loads it the way upstream's loader does (its yaml
through HyperPyYAML, then `load_state_dict(strict=True)`), and runs:

- the LLM, teacher-forced: logits at every speech position for fixed text and speech tokens;
- the flow's `inference`: streaming and non-streaming, final, and a non-final first chunk;
- the causal HiFT's `inference` on the streaming mel, final and non-final, with its fixed noise
  buffers replaced by `HiFTNoise.draw(NOISE_SEED, ...)`; the sha256 of the buffer upstream drew
  itself when its loader built the module is stored too, for `HiFTNoise.released`.

    python -m testbed.cosyvoice3_reference --upstream /tmp/cv3_upstream --deps /tmp/cv3_deps \\
        --commit <upstream commit> --out tests/data/cosyvoice3
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 0
NOISE_SEED = 7
NOISE_SAMPLES = 24000 * 6
PROMPT_TOKENS = 20
TOKENS = 60
FIRST_CHUNK = 30
"""Tokens of the non-final first chunk: with the prompt they end on the 50-frame grid."""
TARGET_TOKENS = 8


def inputs() -> dict[str, np.ndarray]:
    """The fixed inputs every reference is computed from (stored beside the outputs)."""
    gen = torch.Generator().manual_seed(1234)
    return {
        "text": torch.randint(0, 400, (1, 12), generator=gen).numpy(),
        "prompt_speech": torch.randint(0, 6561, (1, 7), generator=gen).numpy(),
        "target": torch.randint(0, 6561, (1, TARGET_TOKENS), generator=gen).numpy(),
        "prompt_tokens": torch.randint(0, 6561, (1, PROMPT_TOKENS), generator=gen).numpy(),
        "tokens": torch.randint(0, 6561, (1, TOKENS), generator=gen).numpy(),
        "prompt_mel": torch.randn(1, 2 * PROMPT_TOKENS, 80, generator=gen).numpy(),
        "embedding": torch.randn(1, 192, generator=gen).numpy(),
    }


def _stub_torchaudio() -> None:
    """Upstream imports torchaudio at module level for audio loading, fbank and the training
    mel module, none of which the paths run here call; PyPI's torchaudio does not load beside
    the CPU torch on these machines, so empty modules stand in for it when it is missing."""
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        for name in ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi",
                     "torchaudio.transforms"):
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module


def _upstream(model_dir: Path) -> dict[str, Any]:
    from testbed.cosyvoice_upstream import install_shims

    _stub_torchaudio()
    install_shims()
    from hyperpyyaml import load_hyperpyyaml

    with (model_dir / "cosyvoice3.yaml").open() as f:
        configs = load_hyperpyyaml(
            f, overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
    llm, flow, hift = configs["llm"], configs["flow"], configs["hift"]
    llm.load_state_dict(torch.load(model_dir / "llm.pt", map_location="cpu"), strict=True)
    flow.load_state_dict(torch.load(model_dir / "flow.pt", map_location="cpu"), strict=True)
    state = torch.load(model_dir / "hift.pt", map_location="cpu")
    hift.load_state_dict({k.replace("generator.", ""): v for k, v in state.items()}, strict=True)
    for module in (llm, flow, hift):
        module.eval()
    return {"llm": llm, "flow": flow, "hift": hift}


@torch.inference_mode()
def _llm_logits(llm: Any, data: dict[str, np.ndarray]) -> np.ndarray:
    text, speech, target = (torch.from_numpy(data[k]) for k in ("text", "prompt_speech", "target"))
    emb = llm.llm.model.model.embed_tokens
    sos = llm.speech_embedding.weight[llm.sos].reshape(1, 1, -1)
    task = llm.speech_embedding.weight[llm.task_id].reshape(1, 1, -1)
    seq = torch.cat([sos, emb(text), task, llm.speech_embedding(speech),
                     llm.speech_embedding(target)], dim=1)
    hidden, _ = llm.llm(seq, torch.tensor([seq.size(1)]))
    start = seq.size(1) - target.size(1) - 1
    return np.asarray(llm.llm_decoder(hidden[:, start:]).numpy())


def _flow(flow: Any, tokens: torch.Tensor, data: dict[str, np.ndarray], streaming: bool,
          finalize: bool) -> np.ndarray:
    prompt = torch.from_numpy(data["prompt_tokens"])
    mel = torch.from_numpy(data["prompt_mel"])
    mel_out, _ = flow.inference(
        token=tokens, token_len=torch.tensor([tokens.size(1)]), prompt_token=prompt,
        prompt_token_len=torch.tensor([prompt.size(1)]), prompt_feat=mel,
        prompt_feat_len=torch.tensor([mel.size(1)]),
        embedding=torch.from_numpy(data["embedding"]), streaming=streaming, finalize=finalize)
    return np.asarray(mel_out[0].numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", type=Path, required=True,
                        help="directory holding upstream's cosyvoice/ package")
    parser.add_argument("--deps", type=Path, help="directory of upstream's extra packages")
    parser.add_argument("--commit", required=True, help="upstream commit the source is from")
    parser.add_argument("--out", type=Path, default=Path("tests/data/cosyvoice3"))
    args = parser.parse_args()
    for path in (args.deps, args.upstream):
        if path is not None:
            sys.path.insert(0, str(path.resolve()))

    from testbed.cosyvoice3_models import build_model_dir, weights_digest
    from worker.engines.cosyvoice.v3_hift import HiFTNoise

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "tiny", seed=SEED)
        up = _upstream(model_dir)
        digest = weights_digest(model_dir)
    data = inputs()
    tokens = torch.from_numpy(data["tokens"])
    out: dict[str, np.ndarray] = dict(data)
    out["llm_logits"] = _llm_logits(up["llm"], data)
    out["flow_streaming"] = _flow(up["flow"], tokens, data, True, True)
    out["flow_full"] = _flow(up["flow"], tokens, data, False, True)
    out["flow_first_chunk"] = _flow(up["flow"], tokens[:, : FIRST_CHUNK + 3], data, True, False)

    hift = up["hift"]
    own = hift.m_source.l_sin_gen.sine_waves[0, :NOISE_SAMPLES].contiguous()
    released = hashlib.sha256(own.numpy().tobytes()).hexdigest()
    noise = HiFTNoise.draw(NOISE_SEED, NOISE_SAMPLES)
    hift.m_source.l_sin_gen.sine_waves = noise.sines.unsqueeze(0)
    mel = torch.from_numpy(out["flow_streaming"]).unsqueeze(0)
    with torch.inference_mode():
        out["hift_final"] = hift.inference(speech_feat=mel, finalize=True)[0][0].numpy()
        out["hift_partial"] = hift.inference(speech_feat=mel, finalize=False)[0][0].numpy()

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "reference.npz", **out)  # type: ignore[arg-type]
    meta = {"upstream": "FunAudioLLM/CosyVoice", "commit": args.commit, "model_seed": SEED,
            "noise_seed": NOISE_SEED, "noise_samples": NOISE_SAMPLES,
            "torch": torch.__version__, "weights_sha256": digest,
            "released_noise_sha256": released}
    (args.out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    for key, value in out.items():
        print(f"{key}: {value.shape} {value.dtype}")


if __name__ == "__main__":
    main()
