"""The training loop's parts against naive references: optimizer groups, WSD, balance, losses, generation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nemotron3 import HybridLM, ModelConfig
from nemotron3.eval.accuracy import greedy_generate, greedy_generate_reference
from nemotron3.model.moe import MoE
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import balance as B
from nemotron3.train import data as train_data
from nemotron3.train import loop
from nemotron3.train.evaluate import eval_mtp_loss
from nemotron3.train.loss import Normalizer, micro_loss
from nemotron3.train.optim import WSD, build_optimizer, param_groups


def small_model(vocab: int = 96, seed: int = 0, **kw) -> HybridLM:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=vocab, hidden_size=64, num_attention_heads=2,
                              head_dim=32, mamba_num_heads=4, moe_latent_size=32, n_routed_experts=8, **kw)
    return HybridLM(cfg)


def random_batch(vocab: int, b: int = 4, t: int = 24, seed: int = 0) -> train_data.Batch:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, vocab, (b, t + 1), generator=g)
    mask = torch.rand(b, t + 1, generator=g) > 0.2
    return train_data.Batch(rows[:, :-1], rows[:, 1:], mask[:, 1:])


# ----------------------------------------------------------------------------------------- optimizer
def test_param_groups_cover_every_parameter_once_and_skip_decay_on_1d():
    model = small_model()
    groups = param_groups(model, 0.1)
    names = groups[0]["names"] + groups[1]["names"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])
    assert any(n.endswith("norm.weight") for n in groups[1]["names"])
    assert any(n.endswith("A_log") for n in groups[1]["names"])
    assert not any("e_score_correction_bias" in n for n in names)  # a buffer: moved by balance.py only
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_weight_decay_is_decoupled_and_applies_to_matrices_only():
    model = small_model()
    opt = build_optimizer(model, lr=0.01, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: AdamW's update is exactly the decoupled decay p *= 1 - lr·wd
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.01 * 0.1) if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


def test_wsd_schedule_warms_up_holds_and_decays_with_minus_sqrt():
    s = WSD(peak=1e-3, total=100, warmup=10, decay_fraction=0.2, min_ratio=0.01)
    lrs = [s.lr(i) for i in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    assert lrs[10:80] == [1e-3] * 70
    for i in range(80, 100):
        p = (i - 80 + 1) / 20
        assert lrs[i] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - math.sqrt(p)))
    assert lrs[-1] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    lin = WSD(peak=1.0, total=10, warmup=0, decay_fraction=0.5, min_ratio=0.0, shape="linear")
    assert [lin.lr(i) for i in range(10)] == pytest.approx([1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.0])


# ----------------------------------------------------------------------------------------- balance
def test_seq_aux_loss_matches_the_loop_reference_and_is_one_when_uniform():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 11, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(B.seq_aux_loss(scores, 3), B.seq_aux_loss_reference(scores, 3))
    # uniform probabilities and perfectly rotating top-k: f_i = 1/E, P_i = 1/E -> L = E·Σ 1/E² = 1
    T, E, k = 8, 8, 2
    uniform = torch.full((1, T, E), 0.5, dtype=torch.float64)
    pick = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        pick[t, (2 * t) % E] = pick[t, (2 * t + 1) % E] = 1.0  # positions take turns: every expert chosen twice
    uniform += 1e-9 * pick[None]
    assert float(B.seq_aux_loss(uniform, k)) == pytest.approx(1.0, abs=1e-5)
    s = scores.clone().requires_grad_()
    B.seq_aux_loss(s, 3).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bias_update_follows_the_sign_rule():
    bias = torch.zeros(4)
    B.update_bias(bias, torch.tensor([10, 30, 20, 20]), rate=1e-3)
    torch.testing.assert_close(bias, torch.tensor([1e-3, -1e-3, 0.0, 0.0]))


def test_bias_update_balances_a_skewed_router():
    """A router that prefers two experts: the bias update alone (no gradient, the recipe's rate 1e-3) evens
    the load out; without it the imbalance stays."""
    torch.manual_seed(0)
    moe = next(m for m in small_model().modules() if isinstance(m, MoE))
    with torch.no_grad():
        moe.gate.weight[:2] += 0.02  # with inputs of positive mean, experts 0 and 1 win most tokens
    x = torch.randn(4, 64, 64) + 0.3
    curves = {}
    for rate in (0.0, 1e-3):
        moe.gate.e_score_correction_bias.zero_()
        bal = B.ExpertBalance(moe, rate=rate, seq_aux_coeff=0.0)
        curves[rate] = []
        for _ in range(120):
            bal.reset()
            bal.active = True
            with torch.no_grad():
                moe(x)
            bal.active = False
            curves[rate].append(max(bal.load_ratio().values()))
            bal.apply_bias_update()
        bal.remove()
    assert curves[0.0][0] > 3 and min(curves[0.0]) > 3
    assert sum(curves[1e-3][-20:]) / 20 < 1.2
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down
    assert not moe._forward_hooks and not moe.record_scores


# ----------------------------------------------------------------------------------------- loss
def test_mtp_loss_aligns_depth_k_with_token_t_plus_k_plus_1():
    model = small_model()
    batch = random_batch(96)
    norm = Normalizer.of(batch.mask, 2)
    got = micro_loss(model, batch, norm, mtp_depths=2, mtp_scale=0.3)
    logits, mtp = model.forward_mtp(batch.inputs, 2)
    full = torch.cat([batch.inputs[:, :1], batch.targets], 1)  # the packed row (B, T+1)
    full_mask = torch.cat([torch.zeros_like(batch.mask[:, :1]), batch.mask], 1)
    T = batch.inputs.shape[1]

    @torch.no_grad()
    def naive(lg, k):  # position t predicts row token t+k+1, wherever that exists and is trainable
        total, n = 0.0, 0
        for b in range(lg.shape[0]):
            for t in range(T - k):
                if full_mask[b, t + k + 1]:
                    total += float(F.cross_entropy(lg[b, t][None], full[b, t + k + 1][None]))
                    n += 1
        return total / n

    assert got.lm == pytest.approx(naive(logits, 0), rel=1e-5)
    assert got.mtp == pytest.approx((naive(mtp[0], 1) + naive(mtp[1], 2)) / 2, rel=1e-5)
    assert float(got.total.detach()) == pytest.approx(got.lm + 0.3 * got.mtp, rel=1e-6)


def test_heldout_mtp_loss_is_the_mean_over_depths_of_each_depths_token_mean():
    """eval_mtp_loss over a 5-row set in batches of 2 against the per-position reference above, row by row."""
    model = small_model()
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(3, 96, (5, 25), generator=g)
    data = train_data.PackedData(rows, torch.rand(5, 25, generator=g) > 0.3)
    with torch.no_grad():
        _, mtp = model.forward_mtp(rows[:, :-1], 2)
    want = []
    for k in (1, 2):  # position t predicts row token t+k+1, over every trainable one of all rows
        ce = [float(F.cross_entropy(mtp[k - 1][b, t][None], rows[b, t + k + 1][None]))
              for b in range(5) for t in range(24 - k) if data.mask[b, t + k + 1]]
        want.append(sum(ce) / len(ce))
    assert eval_mtp_loss(model, data, 2, batch_size=2) == pytest.approx(sum(want) / 2, rel=1e-5)
    assert eval_mtp_loss(model, data, 1, batch_size=2) == pytest.approx(want[0], rel=1e-5)


def test_gradient_is_the_same_however_the_batch_is_split():
    """One 8-row forward vs eight 1-row micro-batches: same objective, same gradient, same loads."""
    model = small_model()
    batch = random_batch(96, b=8)
    grads, loads = [], []
    for micro in (8, 1):
        bal = B.ExpertBalance(model, seq_aux_coeff=1e-2)
        bal.active = True
        norm = Normalizer.of(batch.mask, 2)
        for mb in batch.split(micro):
            micro_loss(model, mb, norm, 2, 0.3, lambda bal=bal: bal.take_aux_loss(8)).total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        loads.append({k: v.clone() for k, v in bal.loads.items()})
        model.zero_grad()
        bal.remove()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7, msg=n)
    for k in loads[0]:
        # expert loads are token counts: integers
        assert torch.equal(loads[0][k], loads[1][k])
    assert sum(int(v.sum()) for v in loads[0].values()) == 8 * 24 * 4 * 5  # 3 backbone + 2 MTP-depth MoE forwards


# ----------------------------------------------------------------------------------------- generation
def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    model = small_model().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (3, 9, 1, 5, 9)]
    stop = {7, 11}
    batched = greedy_generate(model, prompts, 12, stop)
    for p, out in zip(prompts, batched):
        assert out == greedy_generate_reference(model, p, 12, stop)


# ----------------------------------------------------------------------------------------- loop
@pytest.fixture(scope="module")
def tiny_run():
    tok = Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=400)
    data = train_data.build(tok, train_data.task_texts(300, seed=0), seq_len=32, seed=0)
    return tok, data


def test_nan_guard_skips_the_step_and_says_so(tiny_run, tmp_path, monkeypatch, capsys):
    tok, data = tiny_run
    model = small_model(vocab=-(-tok.vocab_size // 64) * 64)
    calls, snapshots = [], {}
    real = loop.micro_loss

    def flaky(model_, *a, **kw):
        calls.append(1)
        snapshots[len(calls)] = [p.detach().clone() for p in model_.parameters()] + [
            b.clone() for n, b in model_.named_buffers() if n.endswith("e_score_correction_bias")]
        out = real(model_, *a, **kw)
        if len(calls) == 3:
            out.total = out.total * float("nan")
            out.lm = float("nan")
        return out

    monkeypatch.setattr(loop, "micro_loss", flaky)
    cfg = loop.TrainConfig(steps=6, batch_size=4, lr=3e-3, eval_every=1000)
    result = loop.train(model, tok, data, cfg, tmp_path)
    assert result.skipped == [3]
    # exact by construction: a skipped step writes no parameter
    for a, b in zip(snapshots[3], snapshots[4]):  # the skipped step changed nothing, bias included
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5]))  # the next one trains again
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2].get("skipped") is True and all("skipped" not in r for i, r in enumerate(records) if i != 2)
    assert math.isfinite(records[-1]["loss"]) and records[-1]["loss"] < records[0]["loss"]
    assert "step 3: non-finite loss" in capsys.readouterr().out


def test_task_accuracy_on_the_engine_equals_the_cache_free_reference(tiny_run, monkeypatch):
    """The exact-match evaluation gives the same completions through the Engine's cache as through full
    recomputation (a random model writes long, varied garbage: a demanding comparison), every one of them."""
    from nemotron3.eval import accuracy as evaluate
    from nemotron3.eval.accuracy import task_accuracy

    tok, _ = tiny_run
    model = small_model(vocab=-(-tok.vocab_size // 64) * 64, seed=3)
    seen: list[list[str]] = []
    real = evaluate.grade_all

    def recording(items, completions, *args, **kw):  # the completions the grader is shown
        seen.append(list(completions))
        return real(items, completions, *args, **kw)

    monkeypatch.setattr(evaluate, "grade_all", recording)
    fast = task_accuracy(model, tok, n_per_family=3, families=["add"])
    slow = task_accuracy(model, tok, n_per_family=3, families=["add"], engine=False)
    assert fast == slow
    assert len(seen) == 2 and len(seen[0]) == 3 and seen[0] == seen[1]
    assert len(set(seen[0])) == 3 and all(len(c) > 10 for c in seen[0])  # three different, non-trivial completions
    assert model.training  # evaluation leaves the model as it found it


def test_metrics_log_on_resume_drops_later_and_torn_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n'
                    '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    loop.MetricsLog(path, resume_step=2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n'
    loop.MetricsLog(path, resume_step=None)
    assert path.read_text() == ""
