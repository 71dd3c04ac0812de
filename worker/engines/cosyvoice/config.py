"""Reading a CosyVoice2 model directory: which files must exist, and the dimensions in its yaml.

The official `cosyvoice2.yaml` is a HyperPyYAML file (`!new:`, `!name:`, `!ref`, `!apply:` tags)
that names upstream classes. This module reads it as plain data: every `!new:`/`!name:` node
becomes a mapping of its keyword arguments, `!ref` expressions are resolved against the top-level
keys, and nothing is imported or instantiated. The engine builds its own modules from the numbers.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REQUIRED_FILES = (
    "cosyvoice2.yaml",
    "llm.pt",
    "flow.pt",
    "hift.pt",
    "campplus.onnx",
    "speech_tokenizer_v2.onnx",
    "spk2info.pt",
    "CosyVoice-BlankEN",
)


class ModelDirError(RuntimeError):
    """The model directory is missing a file or holds one that does not fit; names the file."""


@dataclass(frozen=True)
class LLMConfig:
    speech_token_size: int
    top_p: float
    top_k: int
    win_size: int
    tau_r: float


@dataclass(frozen=True)
class EncoderConfig:
    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    num_up_blocks: int
    static_chunk_size: int
    upsample_stride: int


@dataclass(frozen=True)
class EstimatorConfig:
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int
    static_chunk_size: int


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int
    spk_embed_dim: int
    vocab_size: int
    token_mel_ratio: int
    pre_lookahead_len: int
    inference_cfg_rate: float
    t_scheduler: str
    encoder: EncoderConfig
    estimator: EstimatorConfig


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0_cond_channels: int


@dataclass(frozen=True)
class MelConfig:
    n_fft: int
    num_mels: int
    sampling_rate: int
    hop_size: int
    win_size: int
    fmin: float
    fmax: float | None


@dataclass(frozen=True)
class ModelConfig:
    sample_rate: int
    llm: LLMConfig
    flow: FlowConfig
    hift: HiFTConfig
    mel: MelConfig


class _Node(dict[str, Any]):
    """A `!new:` or `!name:` node: its target name and keyword arguments."""

    def __init__(self, target: str, kwargs: dict[str, Any]) -> None:
        super().__init__(kwargs)
        self.target = target


class _Ref(str):
    """An unresolved `!ref` expression."""


def _loader() -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):  # type: ignore[misc]
        pass

    def construct_target(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return _Node(suffix, loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return _Node(suffix, {"__args__": loader.construct_sequence(node, deep=True)})
        return _Node(suffix, {})

    def construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        assert isinstance(node, yaml.ScalarNode)
        return _Ref(loader.construct_scalar(node))

    for tag in ("!new:", "!name:", "!apply:"):
        Loader.add_multi_constructor(tag, construct_target)
    Loader.add_constructor("!ref", construct_ref)
    # HyperPyYAML reads 1e-06 as a float; YAML 1.1 needs a dot for that.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."),
    )
    return Loader


_OPS: dict[type[ast.AST], Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}


def _evaluate(expr: ast.AST) -> Any:
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.BinOp) and type(expr.op) in _OPS:
        return _OPS[type(expr.op)](_evaluate(expr.left), _evaluate(expr.right))
    raise ValueError("only numbers and + - * / are supported in !ref expressions")


def _resolve(value: Any, top: dict[str, Any], depth: int = 0) -> Any:
    if depth > 20:
        raise ValueError("!ref nesting too deep")
    if isinstance(value, _Ref):
        names = re.findall(r"<([^>]+)>", value)
        if len(names) == 1 and value.strip() == f"<{names[0]}>":
            return _resolve(top[names[0]], top, depth + 1)
        expression = str(value)
        for name in names:
            expression = expression.replace(
                f"<{name}>", repr(_resolve(top[name], top, depth + 1))
            )
        return _evaluate(ast.parse(expression, mode="eval").body)
    if isinstance(value, _Node):
        return _Node(value.target, {k: _resolve(v, top, depth + 1) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, depth + 1) for v in value]
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    """The yaml as nested mappings with every `!ref` resolved; targets are kept, not imported."""
    with path.open(encoding="utf-8") as f:
        raw = yaml.load(f, Loader=_loader())
    if not isinstance(raw, dict):
        raise ValueError("top level is not a mapping")
    return {k: _resolve(v, raw) for k, v in raw.items()}


def _section(tree: dict[str, Any], key: str, suffix: str) -> _Node:
    node = tree.get(key)
    if not isinstance(node, _Node) or not node.target.endswith(suffix):
        raise ValueError(f"{key!r} must be a !new:...{suffix} node")
    return node


def int_tuple(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def required(node: dict[str, Any], key: str, where: str) -> Any:
    """`node[key]`; a missing key raises KeyError naming its path in the yaml (`where.key`)."""
    if key not in node:
        raise KeyError(f"{where}.{key}" if where else key)
    return node[key]


def llm_config(llm: dict[str, Any], sampling: dict[str, Any]) -> LLMConfig:
    """The LLM's codebook size and its repetition-aware sampler's settings."""
    return LLMConfig(
        speech_token_size=int(required(llm, "speech_token_size", "llm")),
        top_p=float(sampling.get("top_p", 0.8)),
        top_k=int(sampling.get("top_k", 25)),
        win_size=int(sampling.get("win_size", 10)),
        tau_r=float(sampling.get("tau_r", 0.1)),
    )


def hift_config(hift: dict[str, Any], f0: dict[str, Any]) -> HiFTConfig:
    """The vocoder's dimensions (CosyVoice2's HiFT and CosyVoice3's causal one share them)."""
    istft = required(hift, "istft_params", "hift")
    return HiFTConfig(
        in_channels=int(hift.get("in_channels", 80)),
        base_channels=int(hift.get("base_channels", 512)),
        nb_harmonics=int(hift.get("nb_harmonics", 8)),
        sampling_rate=int(required(hift, "sampling_rate", "hift")),
        nsf_alpha=float(hift.get("nsf_alpha", 0.1)),
        nsf_sigma=float(hift.get("nsf_sigma", 0.003)),
        nsf_voiced_threshold=float(hift.get("nsf_voiced_threshold", 10)),
        upsample_rates=int_tuple(required(hift, "upsample_rates", "hift")),
        upsample_kernel_sizes=int_tuple(required(hift, "upsample_kernel_sizes", "hift")),
        n_fft=int(required(istft, "n_fft", "hift.istft_params")),
        hop_len=int(required(istft, "hop_len", "hift.istft_params")),
        resblock_kernel_sizes=int_tuple(required(hift, "resblock_kernel_sizes", "hift")),
        resblock_dilation_sizes=tuple(
            int_tuple(d) for d in required(hift, "resblock_dilation_sizes", "hift")),
        source_resblock_kernel_sizes=int_tuple(
            required(hift, "source_resblock_kernel_sizes", "hift")),
        source_resblock_dilation_sizes=tuple(
            int_tuple(d) for d in required(hift, "source_resblock_dilation_sizes", "hift")),
        lrelu_slope=float(hift.get("lrelu_slope", 0.1)),
        audio_limit=float(hift.get("audio_limit", 0.99)),
        f0_cond_channels=int(f0.get("cond_channels", 512)),
    )


def mel_config(feat: dict[str, Any]) -> MelConfig:
    """The prompt mel's settings (`feat_extractor`)."""
    where = "feat_extractor"
    return MelConfig(
        n_fft=int(required(feat, "n_fft", where)),
        num_mels=int(required(feat, "num_mels", where)),
        sampling_rate=int(required(feat, "sampling_rate", where)),
        hop_size=int(required(feat, "hop_size", where)),
        win_size=int(required(feat, "win_size", where)),
        fmin=float(feat.get("fmin", 0)),
        fmax=None if feat.get("fmax") is None else float(feat["fmax"]),
    )


def check_files(model_dir: Path, names: Iterable[str]) -> None:
    """Raise `ModelDirError` naming the directory, or the first released file it lacks."""
    if not model_dir.is_dir():
        raise ModelDirError(f"Model directory {model_dir} does not exist.")
    for name in names:
        if not (model_dir / name).exists():
            raise ModelDirError(f"Model directory {model_dir} lacks {name}.")


def parse_config(tree: dict[str, Any]) -> ModelConfig:
    """Dimensions from a resolved yaml tree; KeyError/ValueError for a shape it cannot serve."""
    llm = _section(tree, "llm", "Qwen2LM")
    sampling = llm["sampling"]
    flow = _section(tree, "flow", "CausalMaskedDiffWithXvec")
    enc = flow["encoder"]
    dec = flow["decoder"]
    est = dec["estimator"]
    cfm = dec["cfm_params"]
    cfm = cfm.get("content", cfm)
    hift = _section(tree, "hift", "HiFTGenerator")
    feat = tree["feat_extractor"]
    channels = int_tuple(est.get("channels", (256, 256)))
    if len(channels) != 1:
        raise ValueError("only a single-level flow estimator (channels: [C]) is supported")
    if int(enc["output_size"]) != 512 or int(flow["input_size"]) != 512:
        raise ValueError("the flow encoder width must be 512 (it is fixed in the released model)")
    return ModelConfig(
        sample_rate=int(tree.get("sample_rate", hift.get("sampling_rate", 24000))),
        llm=llm_config(llm, sampling),
        flow=FlowConfig(
            input_size=int(flow["input_size"]),
            output_size=int(flow["output_size"]),
            spk_embed_dim=int(flow["spk_embed_dim"]),
            vocab_size=int(flow["vocab_size"]),
            token_mel_ratio=int(flow["token_mel_ratio"]),
            pre_lookahead_len=int(flow.get("pre_lookahead_len", 3)),
            inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
            t_scheduler=str(cfm.get("t_scheduler", "cosine")),
            encoder=EncoderConfig(
                input_size=int(enc["input_size"]),
                output_size=int(enc["output_size"]),
                attention_heads=int(enc.get("attention_heads", 4)),
                linear_units=int(enc.get("linear_units", 2048)),
                num_blocks=int(enc.get("num_blocks", 6)),
                num_up_blocks=4,
                static_chunk_size=int(enc.get("static_chunk_size", 0)),
                upsample_stride=2,
            ),
            estimator=EstimatorConfig(
                in_channels=int(est["in_channels"]),
                out_channels=int(est["out_channels"]),
                channels=channels,
                attention_head_dim=int(est.get("attention_head_dim", 64)),
                n_blocks=int(est.get("n_blocks", 1)),
                num_mid_blocks=int(est.get("num_mid_blocks", 2)),
                num_heads=int(est.get("num_heads", 4)),
                static_chunk_size=int(est.get("static_chunk_size", 50)),
            ),
        ),
        hift=hift_config(hift, hift["f0_predictor"]),
        mel=mel_config(feat),
    )


def check_model_dir(model_dir: Path) -> ModelConfig:
    """Check that every released file is present and the yaml parses; errors name the file."""
    check_files(model_dir, REQUIRED_FILES)
    yaml_path = model_dir / "cosyvoice2.yaml"
    try:
        return parse_config(read_yaml(yaml_path))
    except (KeyError, ValueError, TypeError, yaml.YAMLError) as e:
        raise ModelDirError(f"{yaml_path} cannot be read as a CosyVoice2 config: {e!r}") from e
