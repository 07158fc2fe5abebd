"""Checkpoint reading and writing: strictness, sharding, dtypes, and the transformers on-disk names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nemotron3
from nemotron3 import CheckpointError, ModelConfig
from conftest import TINY_HF_CONFIGS, randomize_


@pytest.fixture
def saved(tmp_path):
    config = ModelConfig.from_hf(TINY_HF_CONFIGS["latent-2groups"])
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_disk_names_are_the_transformers_names(saved):
    _, path = saved
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("backbone.layers.1.mixer.experts.15.up_proj.weight").get_shape() == [32, 24]
    assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight",
            "backbone.layers.0.mixer.A_log", "backbone.layers.1.mixer.gate.e_score_correction_bias",
            "backbone.layers.1.mixer.fc1_latent_proj.weight", "backbone.layers.3.mixer.q_proj.weight"} <= keys
    assert not any(k.endswith("experts.up_proj") for k in keys)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


def _rewrite(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("backbone.layers.2.mixer.D"))
    with pytest.raises(CheckpointError, match=r"missing.*backbone\.layers\.2\.mixer\.D"):
        nemotron3.load_pretrained(path)


def test_unexpected_tensor_is_named_but_mtp_is_skipped(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"mtp.layers.0.enorm.weight": torch.ones(64)}))
    nemotron3.load_pretrained(path)  # no MTP block in this config: mtp.* is skipped
    _rewrite(path, lambda t: t.update({"backbone.layers.9.norm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*backbone\.layers\.9\.norm\.weight"):
        nemotron3.load_pretrained(path)


def test_misshaped_tensor_names_both_shapes(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"backbone.layers.0.mixer.out_proj.weight": torch.zeros(64, 63)}))
    with pytest.raises(CheckpointError, match=r"out_proj\.weight.*\[64, 63\].*\[64, 64\]"):
        nemotron3.load_pretrained(path)


def test_missing_folder_and_bad_json_are_clear(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nemotron3.load_pretrained(tmp_path / "nope")
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        nemotron3.load_pretrained(path)


def test_sharded_checkpoint_round_trips(saved, tmp_path):
    model, _ = saved
    out = tmp_path / "sharded"
    nemotron3.save_pretrained(model, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    again = nemotron3.load_pretrained(out)
    ids = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model.eval()(ids), atol=0, rtol=0)
    # re-saving unsharded into the same folder removes the stale shards
    nemotron3.save_pretrained(model, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_dtype_cast_keeps_router_bias_fp32(saved):
    _, path = saved
    m = nemotron3.load_pretrained(path, dtype=torch.bfloat16)
    assert m.backbone.embeddings.weight.dtype == torch.bfloat16
    assert m.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert m(torch.randint(0, 200, (1, 9))).dtype == torch.float32
