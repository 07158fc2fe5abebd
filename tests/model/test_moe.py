"""The grouped expert computation and the router, against token-by-token definitions."""

from __future__ import annotations

import torch
from conftest import tiny_moe_config

from nemotron3.model.moe import MoE, TopKRouter


def test_grouped_experts_equal_the_token_by_token_reference():
    torch.manual_seed(0)
    moe = MoE(tiny_moe_config())
    moe.init_weights(tiny_moe_config(), 1)
    x = torch.randn(50, 12)
    idx = torch.randint(0, 8, (50, 3))
    w = torch.rand(50, 3)
    y, counts = moe.experts(x, idx, w)
    torch.testing.assert_close(y, moe.experts.forward_reference(x, idx, w), atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=8))


def test_grouped_expert_gradients_equal_the_reference():
    torch.manual_seed(1)
    moe = MoE(tiny_moe_config())
    moe.init_weights(tiny_moe_config(), 1)
    x = torch.randn(30, 12, requires_grad=True)
    idx = torch.randint(0, 6, (30, 3))  # experts 6 and 7 get no token: their gradient must be zero
    w = torch.rand(30, 3, requires_grad=True)
    params = [x, w, moe.experts.up_proj, moe.experts.down_proj]
    g1 = torch.autograd.grad(moe.experts(x, idx, w)[0].square().sum(), params)
    g2 = torch.autograd.grad(moe.experts.forward_reference(x, idx, w).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert g1[2][6:].abs().max() == 0


def test_router_is_sigmoid_topk_with_bias_for_selection_only():
    torch.manual_seed(2)
    cfg = tiny_moe_config()
    router = TopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.3)
    router.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(40, 32)
    scores, idx, w = router(x)
    for i in range(40):
        s = torch.sigmoid(router.weight @ x[i])
        chosen = sorted((s + router.e_score_correction_bias).argsort(descending=True)[:3].tolist())
        assert sorted(idx[i].tolist()) == chosen
        expect = s[idx[i]] / s[idx[i]].sum() * 2.5  # weights from the raw scores, not the biased ones
        torch.testing.assert_close(w[i], expect)


def test_moe_layer_composes_latent_projections_and_shared_expert():
    torch.manual_seed(3)
    cfg = tiny_moe_config()
    moe = MoE(cfg)
    moe.init_weights(cfg, 1)
    h = torch.randn(2, 5, 32)
    x = h.reshape(10, 32)
    _, idx, w = moe.gate(x)
    routed = moe.experts.forward_reference(moe.fc1_latent_proj(x), idx, w)
    expect = moe.fc2_latent_proj(routed) + moe.shared_experts(x)
    torch.testing.assert_close(moe(h), expect.view(2, 5, 32), atol=1e-5, rtol=1e-5)
    assert moe.tokens_per_expert.sum() == 10 * 3
