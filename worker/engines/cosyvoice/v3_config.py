"""Reading a CosyVoice3 model directory: its files and the numbers inference needs from its yaml.

The released `cosyvoice3.yaml` is the whole training recipe (discriminators, data pipeline,
optimiser). Only the `llm`, `flow`, `hift` and `feat_extractor` sections are read, as plain data
through `config.read_yaml` (nothing named in the yaml is imported). Every problem is reported as a
`ModelDirError` that names the file, and for the yaml the key, that is missing or does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from worker.engines.cosyvoice.config import (
    HiFTConfig,
    LLMConfig,
    MelConfig,
    ModelDirError,
    check_files,
    hift_config,
    llm_config,
    mel_config,
    read_yaml,
    required,
)

YAML_NAME = "cosyvoice3.yaml"
REQUIRED_FILES = (
    YAML_NAME,
    "llm.pt",
    "flow.pt",
    "hift.pt",
    "campplus.onnx",
    "speech_tokenizer_v3.onnx",
    "CosyVoice-BlankEN",
)
EXTRA_SPEECH_IDS = 200
"""Rows of the speech embedding and head beyond the codebook: sos, eos, task id, fill, unused."""


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: float
    mel_dim: int
    mu_dim: int
    spk_dim: int
    out_channels: int
    static_chunk_size: int
    num_decoding_left_chunks: int


@dataclass(frozen=True)
class V3FlowConfig:
    input_size: int
    output_size: int
    spk_embed_dim: int
    vocab_size: int
    token_mel_ratio: int
    pre_lookahead_len: int
    lookahead_channels: int
    inference_cfg_rate: float
    t_scheduler: str
    dit: DiTConfig


@dataclass(frozen=True)
class V3ModelConfig:
    sample_rate: int
    llm: LLMConfig
    flow: V3FlowConfig
    hift: HiFTConfig
    conv_pre_look_right: int
    mel: MelConfig


def _section(tree: dict[str, Any], key: str, target: str) -> dict[str, Any]:
    node = tree.get(key)
    name = getattr(node, "target", "")
    if not isinstance(node, dict) or not str(name).endswith(target):
        raise KeyError(f"{key!r} must be a !new:...{target} node (found {name or type(node)})")
    return node


def _llm(tree: dict[str, Any]) -> LLMConfig:
    llm = _section(tree, "llm", "CosyVoice3LM")
    return llm_config(llm, llm.get("sampling", {}))


def _flow(tree: dict[str, Any]) -> V3FlowConfig:
    flow = _section(tree, "flow", "CausalMaskedDiffWithDiT")
    look = _section(flow, "pre_lookahead_layer", "PreLookaheadLayer")
    dec = _section(flow, "decoder", "CausalConditionalCFM")
    est = _section(dec, "estimator", "DiT")
    cfm = dec.get("cfm_params", {})
    cfm = cfm.get("content", cfm)
    output_size = int(required(flow, "output_size", "flow"))
    if int(required(flow, "input_size", "flow")) != output_size:
        raise ValueError("flow.input_size must equal flow.output_size (tokens embed to mels)")
    if int(required(est, "mel_dim", "flow.decoder.estimator")) != output_size:
        raise ValueError("flow.decoder.estimator.mel_dim must equal flow.output_size")
    dit = DiTConfig(
        dim=int(required(est, "dim", "flow.decoder.estimator")),
        depth=int(est.get("depth", 8)),
        heads=int(est.get("heads", 8)),
        dim_head=int(est.get("dim_head", 64)),
        ff_mult=float(est.get("ff_mult", 4)),
        mel_dim=output_size,
        mu_dim=int(est.get("mu_dim", output_size)),
        spk_dim=int(est.get("spk_dim", output_size)),
        out_channels=int(est.get("out_channels", output_size)),
        static_chunk_size=int(est.get("static_chunk_size", 50)),
        num_decoding_left_chunks=int(est.get("num_decoding_left_chunks", -1)),
    )
    if dit.num_decoding_left_chunks >= 0:
        raise ValueError("flow.decoder.estimator.num_decoding_left_chunks must be -1 (all)")
    pre_len = int(flow.get("pre_lookahead_len", 3))
    if int(look.get("pre_lookahead_len", pre_len)) != pre_len:
        raise ValueError("flow.pre_lookahead_layer.pre_lookahead_len != flow.pre_lookahead_len")
    return V3FlowConfig(
        input_size=output_size,
        output_size=output_size,
        spk_embed_dim=int(required(flow, "spk_embed_dim", "flow")),
        vocab_size=int(required(flow, "vocab_size", "flow")),
        token_mel_ratio=int(flow.get("token_mel_ratio", 2)),
        pre_lookahead_len=pre_len,
        lookahead_channels=int(required(look, "channels", "flow.pre_lookahead_layer")),
        inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
        t_scheduler=str(cfm.get("t_scheduler", "cosine")),
        dit=dit,
    )


def _hift(tree: dict[str, Any]) -> tuple[HiFTConfig, int]:
    hift = _section(tree, "hift", "CausalHiFTGenerator")
    f0 = _section(hift, "f0_predictor", "CausalConvRNNF0Predictor")
    cfg = hift_config(hift, f0)
    if cfg.sampling_rate == 22050:
        raise ValueError("hift.sampling_rate 22050 selects a different source generator")
    return cfg, int(hift.get("conv_pre_look_right", 4))


def parse_v3_config(tree: dict[str, Any]) -> V3ModelConfig:
    """The inference numbers of a resolved `cosyvoice3.yaml` tree; KeyError names a missing
    key by its path, ValueError a value this implementation cannot serve."""
    feat = required(tree, "feat_extractor", "")
    hift, look_right = _hift(tree)
    return V3ModelConfig(
        sample_rate=int(tree.get("sample_rate", hift.sampling_rate)),
        llm=_llm(tree),
        flow=_flow(tree),
        hift=hift,
        conv_pre_look_right=look_right,
        mel=mel_config(feat),
    )


def check_v3_model_dir(model_dir: Path) -> V3ModelConfig:
    """Check that every released file is present and the yaml fits; errors name the file."""
    check_files(model_dir, REQUIRED_FILES)
    path = model_dir / YAML_NAME
    try:
        return parse_v3_config(read_yaml(path))
    except KeyError as e:
        raise ModelDirError(f"{path} lacks the key {e.args[0]}.") from e
    except (ValueError, TypeError, yaml.YAMLError) as e:
        raise ModelDirError(f"{path} cannot be read as a CosyVoice3 config: {e}") from e
