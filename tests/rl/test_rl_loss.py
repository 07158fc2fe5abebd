"""GRPO arithmetic (rl/loss.py): advantages and the clipped loss against hand-computed cases and TRL's own code.

TRL's `GRPOTrainer._compute_loss` is called unbound on a stand-in trainer whose log-probability hook returns
the test's tensors, so the loss, its gradient and its clip statistics come from TRL's code on the same inputs.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from nemotron3.rl.loss import completion_logprobs, group_advantages, policy_loss

EPS = 1e-4


def test_group_mean_baseline_scaled_by_the_group_std():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])
    a = group_advantages(r, 4)
    s1 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # Bessel-corrected: 0.5
    s2 = math.sqrt(4 * 0.5**2 / 3)
    want = [0.75 / (s1 + EPS), *[-0.25 / (s1 + EPS)] * 3, *[0.5 / (s2 + EPS)] * 2, *[-0.5 / (s2 + EPS)] * 2, 0, 0, 0, 0]
    assert a.advantages.tolist() == pytest.approx(want, rel=1e-12)
    assert a.zero_std.tolist() == [False, False, True]


def test_leave_one_out_baseline_and_its_std():
    r = torch.tensor([1.0, 0, 0, 0])
    a = group_advantages(r, 4, leave_one_out=True)
    # sample 0: the others are [0, 0, 0], mean 0 and std 0 -> unscaled 1 - 0
    # samples 1-3: the others are [1, 0, 0], mean 1/3, sample std sqrt(1/3)
    s = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert a.advantages.tolist() == pytest.approx([1.0, *[(-1 / 3) / (s + EPS)] * 3], rel=1e-12)
    assert a.baseline.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    unscaled = group_advantages(r, 4, scale_rewards="none", leave_one_out=True)
    assert unscaled.advantages.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


def test_batch_scale_none_scale_and_missing_rewards():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    batch = group_advantages(r, 2, scale_rewards="batch")
    s = torch.tensor([1.0, 0.0, 2.0, 2.0]).std().item()
    assert batch.advantages.tolist() == pytest.approx([0.5 / (s + EPS), -0.5 / (s + EPS), 0, 0])
    assert group_advantages(r, 2, scale_rewards="none").advantages.tolist() == [0.5, -0.5, 0.0, 0.0]
    nan = group_advantages(torch.tensor([1.0, math.nan, 0.0, 0.5, 0.5, 0.5]), 3, scale_rewards="none")
    assert nan.advantages.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])  # NaN: A = 0, not counted
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_group_advantages_equal_trls_formula():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(0)
    r = torch.rand(5 * 6).round(decimals=1)
    g = r.view(-1, 6)
    want = (g - g.nanmean(1, keepdim=True)) / (trl_utils.nanstd(g, dim=1)[:, None] + EPS)
    assert torch.allclose(group_advantages(r, 6).advantages, want.reshape(-1).double(), atol=1e-6)


def test_clipped_loss_by_hand():
    # two tokens of one completion, A = +1 and then a second completion with A = -1
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]])).requires_grad_()
    old = torch.zeros(2, 2)  # ratios = exp(logp): 1.5, 0.9 / 0.5, 1.1
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, st = policy_loss(logp, old, adv, mask, epsilon=0.2, loss_type="dapo")
    # A > 0: -min(r, clip(r)) = -1.2 (clipped high), -0.9; A < 0: -min(-r, -clip(r)) = 0.8 (clipped low), 1.1
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.9 + 0.8 + 1.1) / 4)
    assert (st.clip_high, st.clip_low, st.clip_region) == (0.25, 0.25, 0.5)
    loss.backward()
    # clipped tokens carry no gradient; the others -A·r / 4 in d/dlogp
    assert logp.grad.view(-1).tolist() == pytest.approx([0.0, -0.9 / 4, 0.0, 1.1 / 4])


def test_aggregations_and_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    per = torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]])  # ratio 1: -A per active token
    assert float(policy_loss(logp, logp, adv, mask, loss_type="grpo")[0]) == pytest.approx((-4 / 2 + 1 / 1) / 2)
    assert float(policy_loss(logp, logp, adv, mask, loss_type="dapo")[0]) == pytest.approx(float(per.sum()) / 3)
    assert float(policy_loss(logp, logp, adv, mask, loss_type="dr_grpo", max_completion_length=8)[0]) == \
        pytest.approx(float(per.sum()) / (2 * 8))
    ref = logp + torch.tensor([[0.5, -0.5, 9.0], [1.0, 0.0, 0.0]])
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    loss, st = policy_loss(logp, logp, adv, mask, ref_logp=ref, beta=0.1, loss_type="dapo")
    kls = [k3(0.5), k3(-0.5), k3(1.0)]
    assert float(loss.detach()) == pytest.approx((float(per.sum()) + 0.1 * sum(kls)) / 3)
    assert st.kl == pytest.approx(sum(kls) / 3)


def _trl_loss(logp, old, ref, adv, mask, loss_type, beta, eps_low, eps_high, max_len):
    """TRL's `_compute_loss` on these tensors: (loss, its metrics)."""
    trl = pytest.importorskip("trl")
    t = trl.GRPOTrainer.__new__(trl.GRPOTrainer)
    N, T = logp.shape
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros(N, T), None)
    t.aux_loss_enabled, t.top_entropy_quantile, t.off_policy_mask_threshold = False, 1.0, None
    t.importance_sampling_level, t.beta, t.loss_type = "token", beta, loss_type
    t.epsilon_low, t.epsilon_high, t.max_completion_length = eps_low, eps_high, max_len
    t.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.use_vllm, t.model, t.current_gradient_accumulation_steps = False, types.SimpleNamespace(training=True), 1
    t.accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                          gather_for_metrics=lambda x: x, sync_gradients=True)
    t._entropy_bonus_enabled, t._metrics = False, defaultdict(lambda: defaultdict(list))
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return t._compute_loss(None, inputs), t._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_gradient_and_clip_fractions_equal_trls(loss_type, beta):
    torch.manual_seed(1)
    N, T = 6, 7
    mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 1, 6, 4])[:, None]).float()
    old = -torch.rand(N, T) * 3
    ref = -torch.rand(N, T) * 3
    adv = torch.randn(N)
    base = (old + torch.randn(N, T) * 0.4).detach()  # ratios well outside [0.8, 1.28]: both clips active
    mine = base.clone().requires_grad_()
    theirs = base.clone().requires_grad_()
    loss, st = policy_loss(mine, old, adv, mask, ref, 0.2, 0.28, beta, loss_type, max_completion_length=T)
    want, metrics = _trl_loss(theirs, old, ref, adv, mask, loss_type, beta, 0.2, 0.28, T)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    loss.backward()
    want.backward()
    assert torch.allclose(mine.grad, theirs.grad, atol=1e-6)
    assert st.clip_low > 0 and st.clip_high > 0
    assert st.clip_low == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert st.clip_high == pytest.approx(metrics["clip_ratio/high_mean"][0])
    if beta:
        assert st.kl == pytest.approx(metrics["kl"][0], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_batch_loss(loss_type):
    torch.manual_seed(2)
    N, T = 6, 5
    logp, old = -torch.rand(N, T), -torch.rand(N, T)
    mask = (torch.arange(T)[None] < torch.tensor([5, 2, 3, 1, 4, 5])[:, None]).float()
    adv = torch.randn(N)
    whole = policy_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_length=T)[0]
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], loss_type=loss_type, max_completion_length=T,
                            num_items=float(mask.sum()), num_sequences=N)[0] for s in (slice(0, 2), slice(2, 6)))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_completion_logprobs_equal_per_row_forwards():
    import nemotron3

    config = nemotron3.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config).eval()
    prompts, comps = [[5, 6, 7], [9], [3, 4]], [[10, 11], [12, 13, 14, 15], [16]]
    with torch.no_grad():
        logp, ent, mask = completion_logprobs(model, prompts, comps, temperature=0.7)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            row = torch.log_softmax(model(torch.tensor([p + c]))[0] / 0.7, -1)
            want = row[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
            assert torch.allclose(logp[i, : len(c)], want, atol=1e-5)
            assert mask[i].tolist() == [1.0] * len(c) + [0.0] * (4 - len(c))
            probs = row[len(p) - 1].exp()
            assert float(ent[i, 0]) == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-4)
