"""Random-weight CosyVoice3 model directories in the official layout, generated on demand.

`build_model_dir(path, seed=...)` writes a tiny model for CPU tests (a 2-layer 64-wide Qwen2, a
2-layer 64-wide DiT, a thin causal HiFT); `size="full"` writes the released Fun-CosyVoice3-0.5B
dimensions (Qwen2-0.5B, a 22-layer 1024-wide DiT, a 512-channel HiFT) for GPU benchmarks. Both
hold the files a release holds: cosyvoice3.yaml, llm.pt, flow.pt, hift.pt (keys under
`generator.`, weight-normalised convolutions as g/v pairs), campplus.onnx,
speech_tokenizer_v3.onnx (stand-ins with the released signatures), spk2info.pt (built-in
speakers, optional in a release) and CosyVoice-BlankEN/ (Qwen2 config, weights and a byte-level
BPE tokenizer trained on the spot). Parameter names are the released ones, so the loaders that
read these files read a release. Nothing is downloaded; the same seed writes the same weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.cosyvoice_models import SPEAKERS, QwenDims, _onnx_models, _qwen_llm, _weight_normed

F0_BIAS = 120.0
"""Added to the F0 head so that the random vocoder predicts voiced frames (F0 > 10 Hz) and the
harmonic source is exercised, not only the noise."""

_YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

sample_rate: 24000
llm_input_size: {hidden}
llm_output_size: {hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
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

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {lookahead_channels}
        pre_lookahead_len: 3
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
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_head_dim}
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
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
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
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
    fmax: null
    center: False
"""



@dataclass(frozen=True)
class Dims(QwenDims):
    dit_dim: int
    dit_depth: int
    dit_heads: int
    dit_head_dim: int
    lookahead_channels: int
    hift_base: int
    f0_cond: int


TINY = Dims(64, 2, 4, 2, 128, 512, 64, 2, 4, 16, 64, 32, 32)
FULL = Dims(896, 24, 14, 2, 4864, 151936, 1024, 22, 16, 64, 1024, 512, 512)
"""The released cosyvoice3.yaml's flow and HiFT, and its CosyVoice-BlankEN (Qwen2-0.5B)."""


def build_model_dir(
    root: Path, size: str = "tiny", seed: int = 0, speakers: bool = True
) -> Path:
    """Write a complete random-weight CosyVoice3 directory of `size` ("tiny" or "full") into
    `root` and return it; `speakers=False` leaves out spk2info.pt (as the Fun-CosyVoice3-0.5B
    release does).

    The stop ids are among the LLM head's 200 rows past the codebook, so random weights end an
    utterance soon after its minimum length (no bias is needed, unlike CosyVoice2's)."""
    from worker.engines.cosyvoice.v3_config import EXTRA_SPEECH_IDS, check_v3_model_dir
    from worker.engines.cosyvoice.v3_flow import CosyVoice3Flow
    from worker.engines.cosyvoice.v3_hift import CausalHiFT

    dims = {"tiny": TINY, "full": FULL}[size]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "cosyvoice3.yaml").write_text(
        _YAML.format(hidden=dims.qwen_hidden, **dims.__dict__), encoding="utf-8")

    llm = _qwen_llm(root / "CosyVoice-BlankEN", dims)
    rows = 6561 + EXTRA_SPEECH_IDS
    llm["speech_embedding.weight"] = torch.randn(rows, dims.qwen_hidden) * 0.02
    llm["llm_decoder.weight"] = torch.randn(rows, dims.qwen_hidden) * 0.02
    torch.save({k: v.contiguous() for k, v in llm.items()}, root / "llm.pt")

    for name in ("flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx"):
        (root / name).touch()
    config = check_v3_model_dir(root)
    flow = CosyVoice3Flow(config.flow)
    torch.save(flow.state_dict(), root / "flow.pt")
    hift = CausalHiFT(config.hift, config.conv_pre_look_right)
    state = hift.state_dict()
    state["f0_predictor.classifier.bias"] = state["f0_predictor.classifier.bias"] + F0_BIAS
    torch.save({f"generator.{k}": v for k, v in _weight_normed(state).items()}, root / "hift.pt")

    _onnx_models(root, rng, tokenizer_name="speech_tokenizer_v3.onnx")
    if speakers:  # drawn last: the checkpoints are the same with or without it
        spk2info = {name: {"embedding": torch.randn(1, 192)} for name in SPEAKERS}
        torch.save(spk2info, root / "spk2info.pt")
    (root / "GENERATED.json").write_text(json.dumps({"model": f"cosyvoice3-{size}", "seed": seed}))
    return root


def weights_digest(root: Path) -> dict[str, str]:
    """sha256 of every checkpoint's tensors (names, shapes and bytes, in name order): stored
    with the parity references, so a test can tell a changed generator from a changed model."""
    out = {}
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        state = torch.load(root / name, map_location="cpu", weights_only=True)
        h = hashlib.sha256()
        for key in sorted(state):
            value = state[key].contiguous()
            h.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
            h.update(value.numpy().tobytes())
        out[name] = h.hexdigest()
    return out
