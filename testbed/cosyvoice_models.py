"""Random-weight CosyVoice2 model directories in the official layout, generated on demand.

`build_model_dir(path, size="tiny")` writes a small model (2-layer 64-wide Qwen2, thin flow and
vocoder) for CPU tests; `size="full"` writes the released dimensions (Qwen2-0.5B and so on) for GPU
benchmarks. The files are the ones a release holds: cosyvoice2.yaml, llm.pt, flow.pt, hift.pt,
campplus.onnx, speech_tokenizer_v2.onnx, spk2info.pt and CosyVoice-BlankEN/ (Qwen2 config,
weights and a byte-level BPE tokenizer trained on the spot). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPEAKERS = ("中文女", "english_male")
_CORPUS = [
    "Hello world, this is a small speech model used only in tests.",
    "The quick brown fox jumps over the lazy dog. How are you today?",
    "Numbers like one two three, and words such as speech, voice, stream.",
    "你好，世界。今天天气很好，我们一起去公园散步吧！",  # noqa: RUF001
    "这是一个用于测试的小模型。语音合成，流式输出。",  # noqa: RUF001
] * 4


@dataclass(frozen=True)
class QwenDims:
    """The shape of the text LLM (Qwen2) in `CosyVoice-BlankEN`, which both models share."""

    qwen_hidden: int
    qwen_layers: int
    qwen_heads: int
    qwen_kv_heads: int
    qwen_ffn: int
    qwen_vocab: int


@dataclass(frozen=True)
class Dims(QwenDims):
    encoder_heads: int
    encoder_units: int
    encoder_blocks: int
    est_channels: int
    est_head_dim: int
    est_heads: int
    est_blocks: int
    est_mid_blocks: int
    hift_base: int
    f0_cond: int


TINY = Dims(64, 2, 4, 2, 128, 512, 2, 64, 1, 64, 16, 2, 1, 1, 32, 32)
FULL = Dims(896, 24, 14, 2, 4864, 151936, 8, 2048, 6, 256, 64, 8, 4, 12, 512, 512)

_YAML = """\
sample_rate: 24000
llm_input_size: {qwen_hidden}
llm_output_size: {qwen_hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {encoder_heads}
        linear_units: {encoder_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{est_channels}]
            dropout: 0.0
            attention_head_dim: {est_head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {est_mid_blocks}
            num_heads: {est_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_base}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_cond}

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""

_WEIGHT_NORMED = (
    "conv_pre", "ups.", "resblocks.", "source_resblocks.", "conv_post", "f0_predictor.condnet.",
)


def _tokenizer(blank: Path) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(blank))
    return int(tok.get_vocab_size())


def _qwen_llm(blank: Path, dims: QwenDims) -> dict[str, torch.Tensor]:
    """Write `CosyVoice-BlankEN` (the tokenizer and random Qwen2 weights of `dims`) into `blank`;
    return llm.pt's entries for the backbone (`llm.model.`, its LM head tied to the
    embedding)."""
    blank.mkdir(exist_ok=True)
    vocab = _tokenizer(blank)
    qwen = Qwen2Config(
        vocab_size=max(dims.qwen_vocab, vocab + 64), hidden_size=dims.qwen_hidden,
        intermediate_size=dims.qwen_ffn, num_hidden_layers=dims.qwen_layers,
        num_attention_heads=dims.qwen_heads, num_key_value_heads=dims.qwen_kv_heads,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    backbone = Qwen2ForCausalLM(qwen)
    backbone.save_pretrained(str(blank))
    llm = {f"llm.model.{k}": v for k, v in backbone.state_dict().items()}
    llm["llm.model.lm_head.weight"] = backbone.state_dict()["model.embed_tokens.weight"]
    return llm


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older ONNX Runtime releases too
    return model


def _onnx_models(root: Path, rng: np.random.Generator,
                 tokenizer_name: str = "speech_tokenizer_v2.onnx") -> None:
    w = numpy_helper.from_array(rng.standard_normal((80, 192)).astype(np.float32) * 0.1, "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["output"])],
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 192])],
        [w],
    )
    onnx.save(_model(graph),
              str(root / "campplus.onnx"))
    kernel = numpy_helper.from_array(
        rng.standard_normal((16, 128, 4)).astype(np.float32), "kernel")
    scale = numpy_helper.from_array(np.array(401, dtype=np.int64), "scale")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["feats", "kernel"], ["h"], strides=[4]),
         helper.make_node("ArgMax", ["h"], ["best"], axis=1, keepdims=0),
         helper.make_node("Mul", ["best", "scale"], ["indices"])],
        "speech_tokenizer_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "N"])],
        [kernel, scale],
    )
    onnx.save(_model(graph), str(root / tokenizer_name))


def _weight_normed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store conv weights the way a weight-normalised module saves them (g and v)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight") and key.startswith(_WEIGHT_NORMED) and value.dim() == 3:
            base = key[: -len(".weight")]
            out[base + ".parametrizations.weight.original0"] = value.norm(
                dim=(1, 2), keepdim=True)
            out[base + ".parametrizations.weight.original1"] = value
        else:
            out[key] = value
    return out


def build_model_dir(
    root: Path, size: str = "tiny", seed: int = 0, eos_bias: float = 0.0
) -> Path:
    """Write a complete random-weight model directory into `root` and return it.

    Random weights almost never end speech; `eos_bias` (about 4.5) raises the end-of-speech logit
    so utterances end soon after the minimum length, keeping CPU tests short.
    """
    from worker.engines.cosyvoice.config import parse_config, read_yaml
    from worker.engines.cosyvoice.flow import FlowModel
    from worker.engines.cosyvoice.hift import HiFTGenerator

    dims = {"tiny": TINY, "full": FULL}[size]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "cosyvoice2.yaml").write_text(_YAML.format(**dims.__dict__), encoding="utf-8")
    config = parse_config(read_yaml(root / "cosyvoice2.yaml"))

    llm = _qwen_llm(root / "CosyVoice-BlankEN", dims)
    hidden = dims.qwen_hidden
    tokens = config.llm.speech_token_size + 3
    llm["llm_embedding.weight"] = torch.randn(2, hidden) * 0.02
    llm["speech_embedding.weight"] = torch.randn(tokens, hidden) * 0.02
    llm["llm_decoder.weight"] = torch.randn(tokens, hidden) * 0.02
    llm["llm_decoder.bias"] = torch.zeros(tokens)
    llm["llm_decoder.bias"][config.llm.speech_token_size] = eos_bias
    torch.save({k: v.contiguous() for k, v in llm.items()}, root / "llm.pt")

    flow = FlowModel(config.flow)
    torch.save(flow.state_dict(), root / "flow.pt")
    hift = HiFTGenerator(config.hift)
    torch.save(_weight_normed(hift.state_dict()), root / "hift.pt")

    _onnx_models(root, rng)
    spk2info = {name: {"embedding": torch.randn(1, 192)} for name in SPEAKERS}
    torch.save(spk2info, root / "spk2info.pt")
    (root / "GENERATED.json").write_text(json.dumps({"size": size, "seed": seed}))
    return root
