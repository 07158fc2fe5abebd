"""Logit parity with transformers' NemotronHForCausalLM, in both directions of the checkpoint format."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nemotron3

transformers = pytest.importorskip("transformers")


def hf_model(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg)).eval()
    randomize_(model, seed)
    return model


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 37), (3, 70)])  # 70 tokens = 5 chunks of 16
def test_transformers_checkpoint_loads_with_same_logits(tiny_hf_config, tmp_path, batch, seq):
    name, cfg = tiny_hf_config
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nemotron3.load_pretrained(tmp_path)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (batch, seq, cfg["vocab_size"])
    assert expected.abs().max() > 0.5, "reference logits are degenerate; the comparison would be too weak"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_our_checkpoint_loads_in_transformers(tiny_hf_config, tmp_path):
    name, cfg = tiny_hf_config
    config = nemotron3.ModelConfig.from_hf(transformers.NemotronHConfig(**cfg).to_dict())
    torch.manual_seed(0)
    ours = nemotron3.HybridLM(config).eval()
    randomize_(ours, seed=3)
    nemotron3.save_pretrained(ours, tmp_path)
    ref = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 53), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    # and the state round-trips exactly
    again = nemotron3.load_pretrained(tmp_path)
    # exact by construction: safetensors stores the bits
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_router_correction_bias_changes_selection_like_transformers(tmp_path):
    """A large correction bias on one expert must force it into every token's top-k in both systems."""
    cfg = dict(
        hybrid_override_pattern="E", hidden_size=32, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, vocab_size=64,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    ref = hf_model(cfg)
    ref.model.layers[0].mixer.gate.e_score_correction_bias[5] = 10.0
    ref.save_pretrained(tmp_path)
    ours = nemotron3.load_pretrained(tmp_path)
    x = torch.randn(20, 32)
    _, idx, _ = ours.backbone.layers[0].mixer.gate(x)
    assert (idx == 5).any(-1).all()
    _, w_ref, idx_ref = ref.model.layers[0].mixer.gate(x)
    _, idx, w = ours.backbone.layers[0].mixer.gate(x)
    # The choice is discrete but made from fp32 scores that the two systems compute with other kernels: demand the
    # same experts wherever the float64 scores separate the k-th from the (k+1)-th choice by more than 1e-5
    # (a true near-tie may go either way on another CPU), and that such clear rows are nearly all of them.
    gate = ref.model.layers[0].mixer.gate
    s64 = torch.sigmoid(x.double() @ gate.weight.double().t()) + gate.e_score_correction_bias.double()
    top = s64.topk(3, -1).values
    clear = (top[:, 1] - top[:, 2]) > 1e-5
    assert int(clear.sum()) >= 18, "too many near-ties: the comparison would be too weak"
    assert torch.equal(idx.sort(-1).values[clear], idx_ref.sort(-1).values[clear])
    assert torch.equal(idx.sort(-1).values[clear], s64.topk(2, -1).indices.sort(-1).values[clear])
    torch.testing.assert_close(w.gather(1, idx.argsort(-1)), w_ref.gather(1, idx_ref.argsort(-1)))
