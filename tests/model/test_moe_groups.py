"""Group-limited routing (n_group > 1, DeepSeek-V3's rule) against a per-token loop and a hand-worked vector.

The experts are split into n_group contiguous groups; a group's score is the sum of its two best biased
scores; only the topk_group best groups compete, and the top-k experts are taken among them. The combine
weights come from the raw (unbiased) sigmoid scores of the chosen experts. Both the module's router and the
fast decoder's fused MoE step (`MoEStep`) must follow it.
"""

from __future__ import annotations

import torch
from conftest import tiny_moe_config

from nemotron3.model.moe import MoE, MoEStep, TopKRouter


def _reference(choice: list[float], n_group: int, topk_group: int, k: int) -> set[int]:
    size = len(choice) // n_group
    groups = [choice[g * size:(g + 1) * size] for g in range(n_group)]
    score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    kept = sorted(range(n_group), key=lambda g: -score[g])[:topk_group]
    pool = [e for g in kept for e in range(g * size, (g + 1) * size)]
    return set(sorted(pool, key=lambda e: -choice[e])[:k])


def test_hand_worked_vector():
    """8 experts in 4 groups of 2, 2 groups kept, top-2: expert 0 has the best single score (0.9) but its group
    (0.9 + 0.0) loses to groups 1 (0.5 + 0.5) and 3 (0.46 + 0.46); the choice is then 2 and 3 (0.5 each)."""
    choice = [0.9, 0.0, 0.5, 0.5, 0.1, 0.2, 0.46, 0.46]
    assert _reference(choice, 4, 2, 2) == {2, 3}
    cfg = tiny_moe_config(n_group=4, topk_group=2, num_experts_per_tok=2)
    router = TopKRouter(cfg)
    x = torch.eye(32)[:1]  # token 0 reads column 0 of the router weights
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.logit(torch.tensor(choice).clamp(1e-4, 1 - 1e-4))
    scores, idx, w = router(x)
    assert set(idx[0].tolist()) == {2, 3}
    torch.testing.assert_close(w[0], torch.tensor([1.25, 1.25]), atol=1e-4, rtol=0)


def test_router_and_fast_step_follow_the_group_rule():
    torch.manual_seed(0)
    cfg = tiny_moe_config(n_group=2, topk_group=1)  # groups of 4: the top-2 sum is not the group sum
    moe = MoE(cfg)
    moe.init_weights(cfg, 1)
    with torch.no_grad():
        for prm in moe.parameters():  # every weight random: init_weights zeroes some output projections
            torch.nn.init.normal_(prm, std=0.3)
        torch.nn.init.normal_(moe.gate.weight, std=0.5)
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(200, 32)
    scores, idx, w = moe.gate(x)
    bias = moe.gate.e_score_correction_bias
    differs = 0
    for i in range(200):
        s = torch.sigmoid(moe.gate.weight @ x[i])
        choice = (s + bias).tolist()
        want = _reference(choice, 2, 1, 3)
        assert set(idx[i].tolist()) == want, i
        differs += want != set(sorted(range(8), key=lambda e: -choice[e])[:3])  # the groups changed the choice
        torch.testing.assert_close(w[i], s[idx[i]] / s[idx[i]].sum() * 2.5)
    assert differs >= 20  # the rule is exercised, not a no-op on these tokens
    step = MoEStep(moe, cfg)
    for n in (1, 2, 200):  # the per-token, grouped and padded expert paths
        with torch.no_grad():
            torch.testing.assert_close(step(torch.zeros(n, 32), x[:n]), moe(x[:n][None])[0], atol=1e-5, rtol=1e-5)
