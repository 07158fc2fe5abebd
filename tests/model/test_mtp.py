"""The MTP block: checkpoint layout, sizes, the depth recursion with shared weights, and loading rules."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HF_CONFIGS, randomize_

import nemotron3
from nemotron3 import ModelConfig

transformers = pytest.importorskip("transformers")


def mtp_config() -> ModelConfig:
    return ModelConfig.from_hf({**TINY_HF_CONFIGS["latent-2groups"], "num_nextn_predict_layers": 1,
                                "mtp_hybrid_override_pattern": "*E"})


def test_checkpoint_names_follow_the_megatron_bridge_layout(tmp_path):
    model = nemotron3.HybridLM(mtp_config())
    keys = {k for k in model.state_dict() if k.startswith("mtp.")}
    for name in ["mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                 "mtp.layers.0.norm.weight", "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.0.mixer.o_proj.weight",
                 "mtp.layers.1.norm.weight", "mtp.layers.1.mixer.gate.weight",
                 "mtp.layers.1.mixer.gate.e_score_correction_bias", "mtp.layers.1.mixer.fc1_latent_proj.weight",
                 "mtp.layers.1.mixer.shared_experts.up_proj.weight", "mtp.layers.1.final_layernorm.weight"]:
        assert name in keys, name
    assert model.mtp.layers[0].eh_proj.weight.shape == (64, 128)
    assert not hasattr(model.mtp.layers[0], "final_layernorm") and not hasattr(model.mtp.layers[1], "eh_proj")


def test_super_mtp_block_size_is_exact():
    n = nemotron3.count_parameters(ModelConfig.preset("super-120b-a12b"))["total"]
    assert n == 123_611_033_088  # the element count of the official BF16 checkpoint
    assert n - 120_668_707_840 == 2_942_325_248


def test_depths_follow_the_recursion_with_shared_weights():
    torch.manual_seed(0)
    model = nemotron3.HybridLM(mtp_config()).eval()
    randomize_(model)
    ids = torch.randint(0, 200, (2, 23))
    with torch.no_grad():
        logits, (d1, d2) = model.forward_mtp(ids, depths=2)
        h0 = model.hidden_states(ids)
        emb = model.backbone.embeddings
        l0, l1 = model.mtp.layers
        def one_depth(h, shift):
            e = emb(torch.cat([ids[:, shift:], ids[:, :shift]], dim=1))
            u = l0.eh_proj(torch.cat([l0.enorm(e), l0.hnorm(h)], -1))
            u = u + l0.mixer(l0.norm(u))
            u = u + l1.mixer(l1.norm(u))
            return l1.final_layernorm(u)
        h1 = one_depth(h0, 1)
        h2 = one_depth(h1, 2)
    torch.testing.assert_close(logits, model(ids))
    torch.testing.assert_close(d1, model.lm_head(h1))
    torch.testing.assert_close(d2, model.lm_head(h2))
    # causality: depth-1 logits at position t depend on tokens <= t+1 only
    ids2 = ids.clone()
    ids2[:, 15:] = (ids2[:, 15:] + 1) % 200
    with torch.no_grad():
        _, (e1, _) = model.forward_mtp(ids2, depths=2)
    torch.testing.assert_close(e1[:, :14], d1[:, :14])
    assert not torch.allclose(e1[:, 14], d1[:, 14])


def test_mtp_checkpoint_round_trips_and_transformers_ignores_it(tmp_path):
    torch.manual_seed(1)
    model = nemotron3.HybridLM(mtp_config()).eval()
    randomize_(model)
    nemotron3.save_pretrained(model, tmp_path)
    again = nemotron3.load_pretrained(tmp_path)
    assert again.mtp is not None
    # exact by construction: safetensors stores the bits
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    ref = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 200, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_mtp_config_without_mtp_tensors_loads_the_backbone_with_a_warning(tmp_path):
    cfg = {**TINY_HF_CONFIGS["moe-1group"], "num_nextn_predict_layers": 1}
    transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg)).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no mtp"):
        model = nemotron3.load_pretrained(tmp_path)
    assert model.mtp is None and model.config.num_nextn_predict_layers == 0
