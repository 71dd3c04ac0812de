"""The CosyVoice3 LLM's input layout, stop ids and silent-token filter; loading a directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from testbed.cosyvoice3_models import build_model_dir
from worker.engines.cosyvoice.config import ModelDirError
from worker.engines.cosyvoice.decode import PoolDecoder, SlotPool
from worker.engines.cosyvoice.v3_config import REQUIRED_FILES, check_v3_model_dir
from worker.engines.cosyvoice.v3_llm import (
    MAX_SILENT_RUN,
    SILENT_TOKENS,
    CosyVoice3LM,
    filter_silent,
    load_v3_llm,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cv3") / "tiny", seed=1)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> CosyVoice3LM:
    # The tiny vocabulary has no <|endofprompt|>; any id stands in for it.
    return load_v3_llm(model_dir, check_v3_model_dir(model_dir).llm, end_of_prompt=7)


def test_special_ids_and_widths(llm: CosyVoice3LM) -> None:
    assert (llm.sos, llm.task_id) == (6561, 6563)
    assert llm.speech_embedding.num_embeddings == llm.llm_decoder.out_features == 6761
    assert llm.llm_decoder.bias is None
    stops = llm.stop_mask()
    assert int(stops.sum()) == 200
    assert bool(stops[6561])
    assert not bool(stops[6560])
    assert llm.is_stop(6562)
    assert llm.is_stop(6760)
    assert not llm.is_stop(6560)


def test_logp_merges_every_stop_id_into_eos(llm: CosyVoice3LM) -> None:
    embeds = llm.build_input(torch.tensor([[5, 7, 9]]), torch.tensor([[3]]))
    with torch.inference_mode():
        hidden = llm.backbone(inputs_embeds=embeds).last_hidden_state
        logp = llm.logp(hidden)
        full = llm.logits(hidden).softmax(dim=-1)
    assert logp.shape == (1, 6562)
    assert llm.eos == 6561
    assert abs(float(logp.exp().sum()) - 1) <= 1e-5
    assert abs(float(logp[0, llm.eos].exp()) - float(full[0, 6561:].sum())) <= 1e-6
    assert torch.allclose(logp[0, :6561].exp(), full[0, :6561], atol=1e-7)


def test_prompt_layout_uses_speech_embedding_rows(llm: CosyVoice3LM) -> None:
    text = torch.tensor([[5, 7, 9]])
    speech = torch.tensor([[3, 4]])
    with torch.inference_mode():
        embeds = llm.build_input(text, speech)
        weight = llm.speech_embedding.weight
        assert embeds.shape == (1, 1 + 3 + 1 + 2, weight.size(1))
        assert torch.equal(embeds[0, 0], weight[6561])
        assert torch.equal(embeds[0, 4], weight[6563])
        assert torch.equal(embeds[0, 1:4], llm.backbone.embed_tokens(text)[0])
        assert torch.equal(embeds[0, 5:], weight[[3, 4]])


def test_text_without_end_of_prompt_is_refused(llm: CosyVoice3LM) -> None:
    with pytest.raises(ValueError, match="endofprompt"):
        llm.build_input(torch.tensor([[5, 9]]), torch.zeros(1, 0, dtype=torch.long))


def test_teacher_forced_logits_agree_with_one_step_head(llm: CosyVoice3LM) -> None:
    embeds = llm.build_input(torch.tensor([[5, 7, 9]]), torch.tensor([[3]]))
    target = torch.tensor([[10, 11]])
    forced = llm.teacher_forced(embeds, target)
    with torch.inference_mode():
        hidden = llm.backbone(inputs_embeds=embeds).last_hidden_state
        assert (forced[:, 0] - llm.logits(hidden)).abs().max() <= 1e-5


def test_slot_pool_decoding_matches_teacher_forcing_per_row(llm: CosyVoice3LM) -> None:
    """The project's batched KV-cache decoder drives the CosyVoice3 backbone unchanged: two
    requests of different prompt lengths stepping together give each one's own logits."""
    prompts = [llm.build_input(torch.tensor([[5, 7, 9, 11]]), torch.tensor([[3, 4]])),
               llm.build_input(torch.tensor([[7, 8]]), torch.zeros(1, 0, dtype=torch.long))]
    targets = [torch.tensor([[10, 11, 12]]), torch.tensor([[20, 21, 22]])]
    pool = SlotPool(llm.backbone, slots=2, positions=32)
    decoder = PoolDecoder(llm.backbone, pool)
    got: list[list[torch.Tensor]] = [[], []]
    with torch.inference_mode():
        for slot, embeds in enumerate(prompts):
            got[slot].append(llm.logits(decoder.prefill(embeds, slot)))
        positions = torch.tensor([p.size(1) for p in prompts])
        for k in range(2):
            x = torch.cat([llm.speech_embedding(t[:, k : k + 1]) for t in targets])
            hidden = decoder.step(x, positions)
            for slot in range(2):
                got[slot].append(llm.logits(hidden[slot : slot + 1]))
            positions = positions + 1
    for slot in range(2):
        want = llm.teacher_forced(prompts[slot], targets[slot])[0, :3]
        assert (torch.cat(got[slot]) - want).abs().max() <= 1e-4


def test_silent_filter_keeps_five_in_a_row() -> None:
    silent = sorted(SILENT_TOKENS)[0]
    tokens = [100, *[silent] * 8, 200, silent, silent]
    kept, run = filter_silent(tokens)
    assert kept == [100, *[silent] * MAX_SILENT_RUN, 200, silent, silent]
    assert run == 2
    # Token by token, carrying the run length, gives the same.
    pieces, run = [], 0
    for t in tokens:
        got, run = filter_silent([t], run)
        pieces += got
    assert pieces == kept


def test_silent_filter_never_drops_speech() -> None:
    speech = [t for t in range(40) if t not in SILENT_TOKENS]
    assert filter_silent(speech)[0] == speech


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_is_named(model_dir: Path, tmp_path: Path, missing: str) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    target = copy / missing
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(ModelDirError, match=missing.replace(".", r"\.")):
        check_v3_model_dir(copy)


def test_missing_yaml_key_is_named(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    path = copy / "cosyvoice3.yaml"
    path.write_text(path.read_text().replace("    vocab_size: 6561\n", ""))
    with pytest.raises(ModelDirError, match=r"cosyvoice3\.yaml lacks the key flow\.vocab_size"):
        check_v3_model_dir(copy)


def test_cosyvoice2_yaml_is_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    path = copy / "cosyvoice3.yaml"
    path.write_text(path.read_text().replace("CosyVoice3LM", "Qwen2LM"))
    with pytest.raises(ModelDirError, match="CosyVoice3LM"):
        check_v3_model_dir(copy)


def test_checkpoint_of_the_wrong_shape_is_named(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    state = torch.load(copy / "llm.pt", weights_only=True)
    state["llm_decoder.weight"] = state["llm_decoder.weight"][:6564]
    torch.save(state, copy / "llm.pt")
    with pytest.raises(ModelDirError, match=r"llm\.pt.*llm_decoder\.weight"):
        load_v3_llm(copy, check_v3_model_dir(copy).llm)


def test_yaml_is_read_as_plain_data(model_dir: Path) -> None:
    """The generated yaml is the release's shape: upstream class names, HyperPyYAML tags."""
    text = (model_dir / "cosyvoice3.yaml").read_text()
    assert "!new:cosyvoice.flow.DiT.dit.DiT" in text
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
