"""Loading the released checkpoints into this package's modules, by tensor name.

Every key must land on a parameter of the same shape, and every parameter must be filled; any
mismatch fails with an error naming the file and the first offending keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config

from worker.engines.cosyvoice.config import ModelDirError

_NORM_PAIRS = (
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
    (".weight_g", ".weight_v"),
)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelDirError(f"{path} is not a readable PyTorch state dict: {e!r}") from e
    if not isinstance(state, dict):
        raise ModelDirError(f"{path} does not hold a state dict.")
    return state


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each weight-norm pair (g, v) by the plain weight g * v / ||v||."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in _NORM_PAIRS:
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                v = state[base + v_suffix]
                dims = tuple(range(1, v.dim()))
                out[base + ".weight"] = value * v / v.norm(dim=dims, keepdim=True)
                break
            if key.endswith(v_suffix):
                break
        else:
            out[key] = value
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `state` into `module`, requiring the same names and shapes on both sides."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}")
    if wrong:
        problems.append(
            "shape mismatch " + ", ".join(
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in wrong[:5]
            )
        )
    if problems:
        raise ModelDirError(f"{path} does not match the model its directory's yaml describes: "
                            + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def llm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`llm.pt` keys renamed for SpeechLM: backbone under `backbone.`, unused LM head dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("llm.model.model."):
            out["backbone." + key[len("llm.model.model."):]] = value
        elif key.startswith("llm.model.lm_head."):
            continue
        else:
            out[key] = value
    return out


def flow_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state)


def hift_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {k.removeprefix("generator."): v for k, v in state.items()}
    return fold_weight_norm(renamed)


def qwen_config(model_dir: Path) -> Qwen2Config:
    path = model_dir / "CosyVoice-BlankEN" / "config.json"
    if not path.exists():
        raise ModelDirError(f"{path} is missing.")
    try:
        config = Qwen2Config.from_json_file(str(path))
    except Exception as e:
        raise ModelDirError(f"{path} is not a Qwen2 config: {e!r}") from e
    config._attn_implementation = "sdpa"
    return config
