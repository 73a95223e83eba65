"""Weights move both ways between MambaLM and transformers' MambaForCausalLM; bad folders fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamba_training.errors import ModelError
from mamba_training.model import MambaConfig, MambaLM, load_hf, load_hf_weights, read_hf_config, save_hf

import transformers  # noqa: E402  (a test dependency; used offline, built from configs only)

CFG = MambaConfig(d_model=32, n_layer=2, vocab_size=70, d_state=8, dt_rank=3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()


def ours(seed: int = 0, **changes) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(CFG.replace(**changes)).eval()


def token_batch() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 45), generator=torch.Generator().manual_seed(3))


def test_state_dict_names_and_shapes_are_exactly_transformers():
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(**CFG.to_hf_dict()))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours().state_dict().items()}
    assert mine == theirs
    assert "backbone.layers.1.mixer.A_log" in mine and "lm_head.weight" in mine


@pytest.mark.parametrize("scan", ["chunked", "reference"])
def test_transformers_loads_our_saved_model_and_gives_our_logits(tmp_path: Path, scan: str):
    model = ours(scan=scan)
    save_hf(model, tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["config.json", "model.safetensors"]
    hf, info = transformers.MambaForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() == hf.backbone.embeddings.weight.data_ptr()  # tied again
    ids = token_batch()
    with torch.no_grad():
        diff = (model(ids) - hf.eval()(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_we_load_a_transformers_saved_model_and_give_its_logits(tmp_path: Path):
    torch.manual_seed(7)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(**CFG.to_hf_dict())).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf").eval()
    assert model.config.padded_vocab_size == hf.config.vocab_size
    ids = token_batch()
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_save_and_load_round_trip_is_exact(tmp_path: Path):
    model = ours(seed=1)
    save_hf(model, tmp_path / "m")
    back = load_hf(tmp_path / "m")
    assert back.config.to_hf_dict() == model.config.to_hf_dict()
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    assert back.lm_head.weight is back.backbone.embeddings.weight
    assert read_hf_config(tmp_path / "m").padded_vocab_size == CFG.padded_vocab_size


def test_load_weights_into_an_existing_model_replaces_them(tmp_path: Path):
    save_hf(ours(seed=1), tmp_path / "m")
    target = ours(seed=2)
    load_hf_weights(target, tmp_path / "m")
    source = ours(seed=1)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_mamba_ssm_embedding_name_is_accepted(tmp_path: Path):
    save_hf(ours(seed=1), tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    model = load_hf(tmp_path / "m")
    assert torch.equal(model.backbone.embeddings.weight, ours(seed=1).backbone.embeddings.weight)


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path: Path):
    save_hf(MambaLM(CFG.replace(d_state=4)), tmp_path / "other")
    with pytest.raises(ModelError) as err:
        load_hf_weights(ours(), tmp_path / "other")
    assert "backbone.layers.0.mixer.A_log" in str(err.value)
    assert "(64, 4)" in str(err.value) and "(64, 8)" in str(err.value)


def test_missing_tensor_is_named(tmp_path: Path):
    save_hf(ours(), tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["backbone.norm_f.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelError, match="missing tensor backbone.norm_f.weight"):
        load_hf_weights(ours(), tmp_path / "m")


def test_missing_folder_and_missing_files_are_named(tmp_path: Path):
    with pytest.raises(ModelError, match="no such model folder"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json: no such file"):
        load_hf(tmp_path / "empty")
    with pytest.raises(ModelError, match="model.safetensors: no such file"):
        load_hf_weights(ours(), tmp_path / "empty")


def test_corrupt_files_are_model_errors(tmp_path: Path):
    save_hf(ours(), tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_hf_weights(ours(), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not readable JSON"):
        load_hf(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**CFG.to_hf_dict(), "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="model_type is 'gpt2'"):
        load_hf(tmp_path / "m")
