"""Checkpoint reading and writing: strictness, sharding, dtypes, the transformers on-disk names, errors that name
the file or tensor at fault, and the memory a load keeps resident."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_HF_CONFIGS, randomize_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nemotron3
from nemotron3 import CheckpointError, ModelConfig


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
    with pytest.raises(CheckpointError, match=r"out_proj\.weight in model\.safetensors .*\[64, 63\].*\[64, 64\]"):
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
        # exact by construction: the same weights (bits round-tripped), the same kernels on the same shapes
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


def _declare_mtp(path):
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("mtp", [False, True], ids=["no-mtp", "mtp-declared"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_file_is_named(saved, damage, mtp):
    """A config that declares MTP makes the loader look for mtp.* tensors first: that look must not escape either."""
    _, path = saved
    if mtp:
        _declare_mtp(path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": random.Random(0).randbytes(4096),
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        nemotron3.load_pretrained(path)


@pytest.fixture
def sharded(saved, tmp_path):
    model, _ = saved
    nemotron3.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    return tmp_path / "sharded", index


def test_truncated_shard_is_named(sharded):
    path, index = sharded
    shard = path / index["weight_map"]["backbone.layers.4.mixer.experts.3.up_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"cannot read .*{shard.name}"):
        nemotron3.load_pretrained(path)


def test_misshaped_expert_names_tensor_and_shard(sharded):
    path, index = sharded
    name = "backbone.layers.4.mixer.experts.3.up_proj.weight"
    shard = path / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(32, 23)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} in {shard.name} has shape \[32, 23\]"):
        nemotron3.load_pretrained(path)


def test_index_pointing_to_a_missing_shard_is_named(sharded):
    path, index = sharded
    gone = sorted(set(index["weight_map"].values()))[1]
    (path / gone).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json lists shard files that do not exist.*{re.escape(gone)}"):
        nemotron3.load_pretrained(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"weight_map": 3}', '{"metadata": {}}', '{"weight_map": {}}',
                                  b"\xff\xfe garbage"])
def test_bad_index_is_named(sharded, text):
    path, _ = sharded
    index = path / "model.safetensors.index.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=re.escape(str(index))):
        nemotron3.load_pretrained(path)


def test_index_placing_a_tensor_in_the_wrong_shard_is_named(sharded):
    path, index = sharded
    name = "backbone.layers.0.mixer.D"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} in {index['weight_map'][name]}"):
        nemotron3.load_pretrained(path)


def test_tensor_in_two_files_is_named(saved):
    _, path = saved
    save_file({"backbone.norm_f.weight": torch.ones(64)}, str(path / "extra.safetensors"))
    (path / "model.safetensors").rename(path / "main.safetensors")  # no index: every *.safetensors file is read
    both = r"backbone\.norm_f\.weight is in both .*extra\.safetensors and .*main\.safetensors"
    with pytest.raises(CheckpointError, match=both):
        nemotron3.load_pretrained(path)


def test_wrong_dtypes_are_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"backbone.layers.2.mixer.D": torch.ones(8, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.2\.mixer\.D in model\.safetensors has dtype "
                                              r"torch\.int32.*floating-point"):
        nemotron3.load_pretrained(path)
    half = torch.ones(24, 32, dtype=torch.float16)
    _rewrite(path, lambda t: t.update({"backbone.layers.2.mixer.D": torch.ones(8),
                                       "backbone.layers.1.mixer.experts.5.down_proj.weight": half}))
    with pytest.raises(CheckpointError, match=r"experts\.5\.down_proj\.weight in model\.safetensors has dtype "
                                              r"torch\.float16, but the other experts"):
        nemotron3.load_pretrained(path)
    m = nemotron3.load_pretrained(path, dtype=torch.float32)  # an explicit dtype casts them all
    assert m.backbone.layers[1].mixer.experts.down_proj.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        nemotron3.load_pretrained(path, dtype="bfloat16")


def test_missing_config_names_the_folder(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        nemotron3.load_pretrained(path)


def test_mtp_declared_without_mtp_tensors_loads_the_backbone(saved):
    model, path = saved
    _declare_mtp(path)
    with pytest.warns(UserWarning, match="no mtp"):
        again = nemotron3.load_pretrained(path)
    assert again.config.num_nextn_predict_layers == 0
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        # exact by construction: the same weights (bits round-tripped), the same kernels on the same shapes
        torch.testing.assert_close(again(ids), model.eval()(ids), atol=0, rtol=0)


_RSS_PROBE = r"""
import gc, json, sys
import nemotron3

def resident():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

nemotron3.load_pretrained(sys.argv[2])  # warm-up: the first load's one-time costs (lazy imports, allocator pools)
gc.collect()
before = resident()
model = nemotron3.load_pretrained(sys.argv[1])
loaded = resident()
sum(float(t.sum()) for t in model.state_dict().values())  # read every weight, as a forward pass does
print(json.dumps({"loaded": loaded - before, "used": resident() - before}))
"""


def _wide_expert_checkpoint(path, n_experts, width):
    config = ModelConfig(
        pattern="MEME", vocab_size=1024, hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=16, n_groups=2, chunk_size=32,
        n_routed_experts=n_experts, num_experts_per_tok=4, moe_intermediate_size=width,
        moe_shared_expert_intermediate_size=width)
    with torch.device("meta"):
        model = nemotron3.HybridLM(config)
    nemotron3.save_pretrained(model.to_empty(device="cpu"), path)  # the values do not matter here
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
def test_loading_keeps_about_one_copy_resident(tmp_path):
    """Experts dominate this checkpoint (~270 MB, 2 x 64 experts of 512 x 512): the resident growth after loading and
    reading every weight must stay close to the checkpoint's size, i.e. the file pages the per-expert tensors were
    copied from must not stay mapped next to the stacked copies."""
    nbytes = _wide_expert_checkpoint(tmp_path / "big", 64, 512)
    _wide_expert_checkpoint(tmp_path / "small", 4, 16)
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    grown = json.loads(out.stdout.splitlines()[-1])
    assert grown["used"] <= 1.15 * nbytes, (
        f"resident memory grew by {grown['used'] / nbytes:.2f}x the checkpoint's {nbytes / 2**20:.0f} MiB "
        f"({grown['loaded'] / nbytes:.2f}x right after loading)")
