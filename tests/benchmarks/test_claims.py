"""The claim benchmarks (benchmarks/claims/, issue 35): their variants are what they claim to be, their statistics
agree with closed forms and hand-computed cases, and (marked slow) every script's --quick run exits 0 and prints
its table."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLAIMS = ROOT / "benchmarks" / "claims"
sys.path.insert(0, str(CLAIMS))

import common  # noqa: E402
import hybrid_vs_attention  # noqa: E402
import igrpo  # noqa: E402
import latent_moe  # noqa: E402
import mtp_depth  # noqa: E402

from nemotron3.config import ModelConfig  # noqa: E402


# ------------------------------------------------------------------------------------------------ statistics
def test_t_p_values_match_closed_forms_and_tables():
    # df = 1: p = 1 - (2/π)·atan|t|;  df = 2: p = 1 - |t| / sqrt(t² + 2)  (Student's t, closed forms)
    for t in (0.3, 1.0, 2.5, 7.0):
        assert common.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-9)
        assert common.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-9)
    # printed two-sided 5 % critical values: df 4 -> 2.776, df 9 -> 2.262, df 30 -> 2.042
    for t, df in ((2.776, 4), (2.262, 9), (2.042, 30)):
        assert common.t_two_sided_p(t, df) == pytest.approx(0.05, abs=5e-4)
    assert common.t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_paired_test_hand_computed_case():
    # differences 1, 2, 3: mean 2, sd 1, s.e. 1/√3, t = 2√3 on 2 df; of the 8 sign patterns only +++ and ---
    # reach |mean| 2, so the sign-flip p is 2/8
    r = common.paired_test([1.5, 2.0, 3.25], [0.5, 0.0, 0.25])
    assert r["mean"] == pytest.approx(2.0)
    assert r["se"] == pytest.approx(1 / math.sqrt(3))
    assert r["t"] == pytest.approx(2 * math.sqrt(3))
    assert r["df"] == 2
    assert r["p_t"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))
    assert r["p_sign"] == pytest.approx(0.25)
    # differences 1, -1, 2, 0.5 (|sum| 2.5; magnitudes sum to 4.5): flipping a subset of magnitude sum N gives
    # |4.5 - 2N| >= 2.5 iff N <= 1 or N >= 3.5: the subsets {}, {1}, {1'}, {0.5} and their 4 complements, 8 of 16
    assert common.sign_flip_p([1, -1, 2, 0.5]) == pytest.approx(8 / 16)
    assert common.sign_flip_p([1, 2, 3, 4]) == pytest.approx(2 / 16)
    with pytest.raises(ValueError, match="3 values against 2"):
        common.paired_test([1, 2, 3], [1, 2])


def test_verdicts():
    strong = common.paired_test([1.0, 1.1, 0.9, 1.2, 1.05, 0.95], [0.0] * 6)  # p_sign = 2/64
    assert common.verdict(strong, +1) == "reproduced"
    assert common.verdict(strong, -1) == "not reproduced"
    five = common.paired_test([-1.0, -1.2, -0.8, -1.1, -0.9], [0.0] * 5)  # every seed: sign-flip p at its floor 2/32
    assert five["p_sign"] == pytest.approx(2 / 32)
    assert common.verdict(five, -1) == "reproduced"
    weak = common.paired_test([1.0, -0.5, 0.2, 0.1, -0.3], [0.0] * 5)
    assert common.verdict(weak, +1) == "inside the noise"
    mixed = common.paired_test([1.0, 1.1, 0.9, 1.2, -0.05], [0.0] * 5)  # t's p < 0.05, one seed disagrees
    assert mixed["p_t"] < 0.05 and common.verdict(mixed, +1) == "inside the noise"
    few = common.paired_test([1.0, 1.1, 0.9], [0.0, 0.0, 0.0])  # three seeds cannot decide
    assert common.verdict(few, +1).startswith("too few seeds")


def test_mean_se():
    m, se = common.mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(common.mean_se([1.0])[1])


# ------------------------------------------------------------------------------------------------ counted costs
def test_flops_per_token_hand_count():
    # one attention layer, H 64, 4 heads x 16, 2 KV heads, vocab 128: q 64·64, k, v 64·32, o 64·64, head 64·128
    c = ModelConfig(pattern="*", vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16)
    matmul = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 * 128
    assert common.flops_per_token(c, 10) == 2 * matmul + 4 * 4 * 16 * 10


# ------------------------------------------------------------------------------------------------ the variants
def test_latent_moe_variants_match_their_claims():
    v = latent_moe.variants(2)
    base, fl, pa = v["moe"], v["latent-flops"], v["latent-params"]
    assert base.moe_latent_size is None
    assert fl.moe_latent_size == pa.moe_latent_size == base.hidden_size // 2
    # the paper's rule: α·N experts (the flops variant), α·K top-k (both)
    assert fl.n_routed_experts == 2 * base.n_routed_experts
    assert fl.num_experts_per_tok == pa.num_experts_per_tok == 2 * base.num_experts_per_tok
    assert pa.moe_intermediate_size == base.moe_intermediate_size
    p = {n: common.params(c) for n, c in v.items()}
    assert abs(p["latent-flops"]["active"] / p["moe"]["active"] - 1) < 0.005
    assert abs(common.flops_per_token(fl, 128) / common.flops_per_token(base, 128) - 1) < 0.005
    assert abs(p["latent-params"]["total"] / p["moe"]["total"] - 1) < 0.005
    assert all(c.pattern == base.pattern and c.num_nextn_predict_layers == 0 for c in v.values())


def test_latent_moe_dispatch_count_hand_case():
    import torch

    from nemotron3.model import HybridLM

    torch.manual_seed(0)
    c = ModelConfig(pattern="E", vocab_size=64, hidden_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, moe_latent_size=8)
    model = HybridLM(c).eval()
    rows = torch.randint(0, 64, (2, 5))
    gate = model.backbone.layers[0].mixer.gate
    with torch.no_grad():
        x = model.backbone.layers[0].norm(model.backbone.embeddings(rows)).reshape(10, 32)
        _, idx, _ = gate(x)
    # row 0's tokens live on rank 0 (experts 0, 1), row 1's on rank 1 (experts 2, 3)
    rank = torch.tensor([0] * 5 + [1] * 5)
    off = int(((idx // 2) != rank[:, None]).sum())
    assert latent_moe.dispatch_bytes(model, rows) == pytest.approx(off * 8 * 2 * 2 / 10)


def test_attention_only_twin_has_no_mamba_and_the_same_size():
    v = hybrid_vs_attention.variants()
    h, a = v["hybrid"], v["attention"]
    assert "M" not in a.pattern and len(a.pattern) == len(h.pattern)
    assert [c for c in a.pattern if c != "*"] == [c for c in h.pattern if c not in "M*"]
    assert a.num_key_value_heads == h.num_key_value_heads and a.num_attention_heads % a.num_key_value_heads == 0
    assert abs(common.params(a)["total"] / common.params(h)["total"] - 1) < 0.01
    # the attention-only cache: 4 layers x (K and V) x 2 KV heads x 64 x 4 bytes per token, nothing recurrent
    assert hybrid_vs_attention.cache_bytes(a, 1000) == 4 * 2 * 2 * 64 * 4 * 1000
    assert hybrid_vs_attention.cache_bytes(h, 65536) < hybrid_vs_attention.cache_bytes(a, 65536) / 3
    weights = common.params(a)["total"] * 4
    assert hybrid_vs_attention.max_batch(a, 65536) == (8 * 2**30 - weights) // (4 * 2 * 2 * 64 * 4 * 65536)


def test_mtp_variants():
    v = mtp_depth.variants()
    assert v["no-mtp"]["mtp_depths"] == 0
    assert {(s["mtp_depths"], s["mtp_scale"]) for n, s in v.items() if n != "no-mtp"} == \
        {(1, 0.3), (2, 0.3), (3, 0.3), (2, 0.1), (2, 1.0)}
    assert len(mtp_depth.variants(grid=True)) == 10
    assert mtp_depth.model_config().num_nextn_predict_layers == 1


def test_igrpo_mean_exact_match():
    assert igrpo.mean_em({"add": 0.5, "mul": 0.25}) == pytest.approx(37.5)


# ------------------------------------------------------------------------------------------------ --quick runs
@pytest.mark.slow
@pytest.mark.parametrize("script", ["latent_moe", "hybrid_vs_attention", "mtp_depth", "igrpo"])
def test_quick_run_prints_its_table(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(CLAIMS / f"{script}.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|---|" in proc.stdout and "±" in proc.stdout
    assert (tmp_path / f"{script}.png").stat().st_size > 10_000
