"""The run report says only what it measured (issue 28): W4A4 rows with quantized activations, accuracy with its
binomial standard error, the RL held-out curve, labels that do not overlap, and where the engine and transformers
part. Fast pieces only; tests/run/test_run.py runs the whole pipeline."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_HF_CONFIGS, randomize_
from rich.console import Console
from safetensors.torch import load_file

import nemotron3
from nemotron3 import ModelConfig
from nemotron3.engine import Engine
from nemotron3.eval.accuracy import greedy_generate_reference
from nemotron3.model.moe import Experts
from nemotron3.quant.nvfp4 import nvfp4_quantize
from nemotron3.run import measure, plots, report, stages
from nemotron3.run.plan import RL_CURVE_EVALS, RL_CURVE_PROBLEMS, plan
from nemotron3.stages.quantize import QuantizeConfig, quantize
from nemotron3.tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------- W4A4 rows
@pytest.fixture(scope="module")
def nvfp4_pair(tmp_path_factory):
    """One tiny MoE checkpoint (every quantizable input width a multiple of 16) exported as nvfp4 and
    nvfp4-w4a16."""
    root = tmp_path_factory.mktemp("w4a4")
    config = ModelConfig.from_hf({**TINY_HF_CONFIGS["moe-1group"], "vocab_size": 320})
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, root / "src")
    Tokenizer.train([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], 320).save(root / "src")
    return {s: quantize(QuantizeConfig(model=root / "src", out=root / s, scheme=s, calib=4))
            for s in ("nvfp4", "nvfp4-w4a16")}


class _CodecExperts:
    """An Experts gemm_quantizer that runs the NVFP4 codec on each expert GEMM's input (reference only)."""

    def __init__(self, experts: Experts, fqn: str, scales: dict[str, torch.Tensor]) -> None:
        self.by_ptr = {w.data_ptr(): scales.get(f"{fqn}.{e}.{p}") for p in ("up_proj", "down_proj")
                       for e, w in enumerate(getattr(experts, p).unbind(0))}

    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gs = self.by_ptr[w.data_ptr()]
        return torch.nn.functional.linear(x if gs is None else _codec(x, gs), w)


def _codec(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """x through the NVFP4 codec (te convention, 1x16 blocks) with the checkpoint's encode-form global scale."""
    return nvfp4_quantize(x.float(), per_tensor_scale=1.0 / input_global_scale.float().reshape(())).dequantize()


def _explicit_w4a4(folder) -> torch.nn.Module:
    """The weights-only load of an nvfp4 checkpoint with every quantized GEMM's input sent through the NVFP4
    codec by hand: an independent W4A4 reference."""
    model = nemotron3.load_pretrained(folder, dtype=torch.float32, dequantize=True)  # decoded, hooks added here
    disk = load_file(str(folder / "model.safetensors"))
    scales = {k.removesuffix(".input_global_scale"): v for k, v in disk.items() if k.endswith(".input_global_scale")}
    assert scales
    hooked = 0
    for fqn, mod in model.named_modules():
        if isinstance(mod, Experts) and any(n.startswith(f"{fqn}.") for n in scales):
            mod.gemm_quantizer = _CodecExperts(mod, fqn, scales)
            hooked += 1
        elif type(mod) is torch.nn.Linear and fqn in scales:
            mod.register_forward_pre_hook(lambda m, a, gs=scales[fqn]: (_codec(a[0], gs),))
            hooked += 1
    assert hooked > 2
    return model


def test_w4a4_rows_quantize_activations(nvfp4_pair):
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w4a4 = stages.load_scheme(nvfp4_pair["nvfp4"])(ids).float()
        w4a16 = stages.load_scheme(nvfp4_pair["nvfp4-w4a16"])(ids).float()
        ref = _explicit_w4a4(nvfp4_pair["nvfp4"])(ids).float()
    # both exports hold the same weight codes, so W4A4 and W4A16 differ only by the activations' rounding
    gap = (w4a4 - w4a16).abs().max().item()
    assert gap > 1e-2, gap
    # the reference rounds its products in another order (1/(1/gs) for gs, amax·(gs/6) for gs·amax/6), so a block
    # scale or code near a rounding midpoint may differ by one step: a tolerance far under the W4A16 gap
    torch.testing.assert_close(w4a4, ref, rtol=0, atol=gap / 50)


def test_w4a4_generation_quantizes_activations_at_every_step(tmp_path):
    """The stage measures through the Engine: on a dense model (no expert quantizer) its fused decode path must
    not skip the activation hooks, or every token after the first is a W4A16 token."""
    config = ModelConfig.from_hf({**TINY_HF_CONFIGS["dense-mlp"], "vocab_size": 320})
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, tmp_path / "src")
    Tokenizer.train([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], 320).save(tmp_path / "src")
    folder = quantize(QuantizeConfig(model=tmp_path / "src", out=tmp_path / "q", scheme="nvfp4", calib=4))
    prompt = [1, 5, 9, 33, 70, 2, 11]
    got = Engine(stages.load_scheme(folder)).generate([prompt], 8, stop_token_ids=[]).tokens[0]
    want = greedy_generate_reference(_explicit_w4a4(folder), prompt, 8, set())
    assert got == want


# ----------------------------------------------------------------------------------------- the RL curve
def test_rl_evaluates_held_out_on_a_subset_between_before_and_after(tmp_path, monkeypatch):
    from conftest import small_model

    from nemotron3.rl import grpo as grpo_mod
    from nemotron3.train import checkpoint
    from nemotron3.train import data as train_data

    tok = Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=300)
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    ckpt = checkpoint.save(tmp_path / "sft", model, tok)
    calls = []
    real = grpo_mod.accuracy_by_mode

    def recorded(model, tokenizer, n, *args, **kwargs):
        calls.append(n)
        return real(model, tokenizer, n, *args, **kwargs)

    monkeypatch.setattr(grpo_mod, "accuracy_by_mode", recorded)
    cfg = grpo_mod.GRPOConfig(model=ckpt, out=tmp_path / "rl", steps=4, prompts_per_step=2, num_generations=2,
                              max_completion_length=6, families=["add"], eval_problems=3, eval_every=1,
                              eval_every_problems=1, log_every=100)
    grpo_mod.grpo(cfg, Console(file=io.StringIO()))
    assert calls == [3, 1, 1, 1, 3]                  # full before, the subset at steps 1-3, full after
    held = [r for r in map(json.loads, (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines())
            if "heldout_accuracy" in r]
    assert [(r["step"], r["heldout_problems"]) for r in held] == [(1, 1), (2, 1), (3, 1), (4, 3)]


@pytest.mark.parametrize("budget", [0.5, 1, 20, 40, 60])
def test_the_rl_stages_curve_fits_inside_the_stage(budget):
    p = plan(budget)
    at = list(range(p.rl_eval_every, p.rl_steps, p.rl_eval_every))   # grpo evaluates at multiples, before the end
    assert 2 <= len(at) <= RL_CURVE_EVALS and (len(at) == RL_CURVE_EVALS or p.rl_steps < 5 * RL_CURVE_EVALS)
    gaps = {b - a for a, b in zip([0, *at], [*at, p.rl_steps])}
    assert max(gaps) - min(gaps) <= p.rl_eval_every                # evenly spaced up to the last step
    assert p.rl_curve_problems == min(RL_CURVE_PROBLEMS, p.eval_problems)


# ----------------------------------------------------------------------------------------- standard errors
def _binomial_sd_of_rate(p: float, n: int) -> float:
    """The standard deviation of k/n for k ~ Binomial(n, p), summed over the whole distribution (float64)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    return math.sqrt(sum(w * (k / n - p) ** 2 for k, w in enumerate(pmf)))


@pytest.mark.parametrize("p,n", [(0.5, 80), (0.51, 80), (0.125, 40), (0.0, 80), (1.0, 20), (0.3, 7)])
def test_binomial_se_is_the_sd_of_the_measured_rate(p, n):
    assert report.binomial_se(p, n) == pytest.approx(_binomial_sd_of_rate(p, n), rel=1e-9, abs=1e-15)


def test_mean_se_of_independent_families():
    ps, n = [0.51, 0.14, 0.18, 0.38, 0.38, 0.12], 80
    want = math.sqrt(sum(_binomial_sd_of_rate(p, n) ** 2 for p in ps)) / len(ps)   # Var(mean) = sum Var / F^2
    assert report.mean_se(ps, n) == pytest.approx(want, rel=1e-9)
    assert 0.055 < report.binomial_se(0.5, 80) < 0.056                              # the "about ±5 points"
    for bad in [(0.5, 0), (1.2, 80), (-0.1, 80)]:
        with pytest.raises(ValueError):
            report.binomial_se(*bad)


# ----------------------------------------------------------------------------------------- a synthetic run
FAMS = ["add", "countdown", "modpow", "mul", "sort", "word"]
SCHEMES = {"fp32": (21, 7.37), "bf16": (21, 3.69), "nvfp4": (22, 3.34), "nvfp4-w4a16": (22, 3.33), "fp8": (21, 3.88),
           "mx9": (21, 3.99), "mx6": (21, 3.55), "mx4": (20, 3.25), "mxfp4": (20, 3.28), "seedlm4": (20, 3.27),
           "seedlm3": (19, 3.12)}  # (correct of 80 per family, MB): mx4, mxfp4 and seedlm4 all but coincide


def _acc(k: int, shift: int = 0) -> dict[str, float]:
    return {f: (k + 3 * i - 7 + shift) / 80 for i, f in enumerate(FAMS)}


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if isinstance(obj, dict) else "\n".join(map(json.dumps, obj)) + "\n")


@pytest.fixture
def synthetic_run(tmp_path):
    """A run folder with every stage's summary and metrics (made-up numbers, the stages' own keys)."""
    out = tmp_path / "run"
    modes = {"on": _acc(18), "off": _acc(8), "budget_8": _acc(9), "budget_24": _acc(11)}
    s = {"pretrain": {"accuracy": _acc(20), "config": {"eval_problems": 80, "steps": 300,
                                                        "nvfp4_high_precision_tail": 0.18},
                      "eval_losses": [[300, 0.5]], "parameters": 1_835_912, "steps": 300, "unigram_baseline": 3.5},
         "precision": {"step": 90, "steps_of": 300, "nvfp4_eval_loss": 0.91, "high_precision_eval_loss": 0.90,
                       "gap_relative": 0.011, "gap_nats": 0.01},
         "sft": {"accuracy_after": modes, "config": {"eval_problems": 80}},
         "rl": {"algo": "grpo", "steps": 240, "rollouts_per_prompt": 16, "reward_first": 0.02, "reward_last": 0.26,
                "token_mult_prob_error_max": 1.0, "accuracy_before": _acc(18), "accuracy_after": _acc(24),
                "config": {"eval_problems": 80}},
         "eval": {"accuracy": {m: _acc(k) for m, k in (("off", 9), ("budget_8", 9), ("budget_24", 12))},
                  "problems_per_family": 80},
         "speculative": {"by_k": {str(k): {"acceptance_length": 1.5 + k / 3, "tok_s": 500 - 30 * k,
                                           "speedup": 0.8 - 0.05 * k, "identical": True} for k in (1, 2, 3)},
                         "prompts": 16, "plain_tok_s": 634.0, "sft_acceptance_length_k3": 2.4},
         "speed": {"transformers_tok_s": 180.0, "nemotron3_tok_s": 715.0, "ratio": 3.97, "identical": False,
                   "new_tokens": 128, "divergence": {"position": 57, "tokens": 128, "reference_token": 412,
                                                     "our_token": 97, "reference_top2_margin": 3e-5,
                                                     "max_abs_logit_diff": 2e-5, "logit_scale": 18.0,
                                                     "near_tie": True}},
         "quantize": {"problems_per_family": 40, "skipped": {}, "schemes": {
             name: {"accuracy": _acc(k), "accuracy_mean": sum(_acc(k).values()) / 6, "bytes": int(mb * 1e6),
                    "activations": stages.ACTIVATIONS.get(name, "fp32 (weight-only scheme)")}
             for name, (k, mb) in SCHEMES.items()}}}
    for name, summary in s.items():
        _write(out / name / "summary.json", summary)
    pre = [{"step": t, "loss": 3 / t**0.3, "mtp_loss": 3.3 / t**0.3, "load_max_min": 1 + 4 / t**0.5}
           for t in range(1, 301)]
    pre += [{"step": t, "eval_loss": 3 / t**0.3, "eval_mtp_loss": 3.2 / t**0.3} for t in range(30, 301, 30)]
    _write(out / "pretrain" / "metrics.jsonl", pre)
    _write(out / "precision" / "twin" / "metrics.jsonl", [{"step": t, "eval_loss": 2.9 / t**0.3} for t in (30, 60, 90)])
    _write(out / "sft" / "metrics.jsonl", [{"step": t, "load_max_min": 1.8} for t in range(1, 301)])
    rl = [{"step": t, "reward": t / 900, "accuracy": t / 1000} for t in range(1, 241)]
    rl += [{"step": t, "heldout_accuracy": _acc(18 + t // 48), "heldout_problems": 20} for t in (48, 96, 144, 192)]
    _write(out / "rl" / "metrics.jsonl", rl + [{"step": 240, "heldout_accuracy": _acc(24), "heldout_problems": 80}])
    return out, s


def _pct_se(p: float, n: int) -> str:
    return f"{100 * p:.0f} ± {100 * _binomial_sd_of_rate(p, n):.0f} %"


def test_accuracy_tables_carry_a_standard_error_and_say_what_it_is(synthetic_run):
    out, s = synthetic_run
    rep = report.build(out, plan(20), dict.fromkeys(s, "done"), dict.fromkeys(s, 1.0))
    md = (out / "report.md").read_text()
    for f in FAMS:
        pre, sft, rl = _acc(20)[f], _acc(18)[f], _acc(24)[f]
        diff = math.hypot(_binomial_sd_of_rate(sft, 80), _binomial_sd_of_rate(rl, 80))
        assert (f"| {f} | {_pct_se(pre, 80)} | {_pct_se(sft, 80)} | {_pct_se(rl, 80)} | "
                f"{100 * (rl - sft):+.0f} ± {100 * diff:.0f} |") in md
        assert f"| RL {f} | {_pct_se(rl, 80)} | {_pct_se(_acc(9)[f], 80)} |" in md
    assert "± is one standard error of the sampling of problems, √(p(1 − p)/n), with n = 80" in md
    mx4 = _acc(20)
    assert (f"| mx4 | fp32 (weight-only scheme) | 3.25 MB | {100 * sum(mx4.values()) / 6:.0f} ± "
            f"{100 * report.mean_se(list(mx4.values()), 40):.0f} % | {_pct_se(mx4['add'], 40)} |") in md
    assert "| nvfp4 | NVFP4 (W4A4) |" in md
    assert rep["problems_per_family"] == {"pretrain": 80, "sft": 80, "rl": 80, "eval": 80, "quantize": 40}
    assert [(c["step"], c["problems"]) for c in rep["rl_heldout_curve"]["rl"]] == [
        (0, 80), (48, 20), (96, 20), (144, 20), (192, 20), (240, 80)]
    assert "at 6 points of the run: before (step 0), at steps 48, 96, 144, 192 (the first 20 problems" in md


def test_every_plot_is_readable_at_the_width_the_report_shows_it(synthetic_run):
    out, s = synthetic_run
    acc = report.accuracy_tables(s)
    with plots._style():
        figs = plots.figures(out, s, acc)
        assert [name for name, _, _ in figs] == ["loss.png", "balance.png", "accuracy.png", "rl.png",
                                                 "speculative.png", "speed.png", "quantize.png"]
        for name, _, fig in figs:
            assert fig.bbox.width <= plots.WIDTH_PX, name
            assert plots.text_problems(fig) == [], name
        ticks = [t.get_text() for t in figs[-1][2].axes[0].get_yticklabels()]
        assert {"mx4", "mxfp4", "seedlm4", "nvfp4 (W4A4)", "fp8 (W8A8)"} <= set(ticks)
        from matplotlib.container import BarContainer

        bars = [c for c in figs[2][2].axes[0].containers if isinstance(c, BarContainer)][0]
        half = [abs(y1 - y0) / 2 for (_, y0), (_, y1) in bars.errorbar.lines[2][0].get_segments()]
        assert half == pytest.approx([100 * _binomial_sd_of_rate(_acc(20)[f], 80) for f in FAMS], rel=1e-6)


def test_the_readability_check_sees_overlap_small_text_and_clipping():
    import matplotlib.pyplot as plt

    with plots._style():
        fig, ax = plt.subplots(figsize=(12, 4))      # 1200 px: shown at 960, 0.8x
        ax.text(0.5, 0.5, "mx4", transform=ax.transAxes, fontsize=10)
        ax.text(0.505, 0.5, "mxfp4", transform=ax.transAxes, fontsize=10)
        found = plots.text_problems(fig)
        assert any("'mx4' overlaps 'mxfp4'" in p for p in found)
        assert any("px shown" in p for p in found)   # the 9 pt tick labels shown at 0.8x: 10 px
        ax.text(1.3, 0.5, "seedlm4", transform=ax.transAxes, fontsize=14)
        assert any("'seedlm4': outside the figure" in p for p in plots.text_problems(fig))
        plt.close(fig)


# ----------------------------------------------------------------------------------------- where two decodes part
@pytest.mark.parametrize("a,b,want", [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([4], [5], 0),
                                      ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1], 1), ([], [], None), ([], [7], 0)])
def test_first_divergence(a, b, want):
    assert measure.first_divergence(a, b) == want
    assert measure.first_divergence(b, a) == want


def test_divergence_tells_a_near_tie_from_a_disagreement():
    prompt, ref_tokens, our_tokens = [9, 8], [1, 2, 3, 4], [1, 2, 7, 4]
    seen = []

    def logits(values: dict[int, float]):
        def at(ids: list[int]) -> torch.Tensor:
            seen.append(list(ids))
            out = torch.zeros(10, dtype=torch.float64)
            for k, v in values.items():
                out[k] = v
            return out
        return at

    tie = measure.divergence(prompt, ref_tokens, our_tokens, logits({3: 12.0, 7: 12.0 - 4e-6, 0: -11.0}),
                             logits({3: 12.0 - 1e-6, 7: 12.0 + 1e-6, 0: -11.0}))
    assert seen == [[9, 8, 1, 2], [9, 8, 1, 2]]                      # both read the shared prefix
    assert tie["position"] == 2 and tie["reference_token"] == 3 and tie["our_token"] == 7
    assert tie["reference_top2_margin"] == pytest.approx(4e-6, rel=1e-3)
    assert tie["max_abs_logit_diff"] == pytest.approx(5e-6, rel=1e-3) and tie["logit_scale"] == 12.0
    assert tie["near_tie"] is True and (tie["reference_argmax"], tie["our_argmax"]) == (3, 7)
    bug = measure.divergence(prompt, ref_tokens, our_tokens, logits({3: 12.0, 7: 9.0}), logits({3: 8.0, 7: 12.0}))
    assert bug["reference_top2_margin"] == pytest.approx(3.0) and bug["near_tie"] is False
    same = measure.divergence(prompt, ref_tokens, list(ref_tokens), logits({}), logits({}))
    assert same == {"position": None, "tokens": 4}


def test_the_report_words_follow_the_measurement():
    base = {"new_tokens": 128, "identical": False}
    d = {"position": 57, "tokens": 128, "reference_token": 412, "our_token": 97, "reference_argmax": 97,
         "our_argmax": 97, "reference_top2_margin": 3e-5, "max_abs_logit_diff": 2e-5, "logit_scale": 18.0}
    tie = report.divergence_text({**base, "divergence": {**d, "near_tie": True}})
    assert "the same first 57 tokens and part at token 58 of 128" in tie and "ranks token 97 first" in tie
    assert "a near-tie in fp32, which transformers' generate resolved the other way in its cached decode" in tie
    tie = report.divergence_text({**base, "divergence": {**d, "reference_argmax": 412, "near_tie": True}})
    assert "which the engine resolved the other way" in tie
    bug = report.divergence_text({**base, "divergence": {**d, "max_abs_logit_diff": 2.5, "near_tie": False}})
    assert "not a near-tie" in bug and "near-tie in fp32" not in bug and "both full forwards agree" not in bug
    # far from a tie, the full forwards agree with each other and with the engine: transformers' cached decode departs
    cached = report.divergence_text({**base, "divergence": {**d, "reference_top2_margin": 0.071,
                                                            "max_abs_logit_diff": 5e-6, "near_tie": False}})
    assert "both full forwards agree: transformers' generate's cached decode departs" in cached
    same = report.divergence_text({**base, "identical": True, "divergence": {"position": None, "tokens": 128}})
    assert same == "Both emitted the same 128 tokens (compared token by token)."


def test_engine_vs_transformers_names_where_they_part(tmp_path):
    pytest.importorskip("transformers")
    config = ModelConfig.from_hf({**TINY_HF_CONFIGS["moe-1group"], "vocab_size": 256})
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, tmp_path / "ckpt")
    ours = nemotron3.load_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    prompt = [3, 14, 15, 92, 65]
    same = measure.engine_vs_transformers(tmp_path / "ckpt", ours, prompt, new_tokens=6, repeats=1)
    assert same["identical"] and same["divergence"] == {"position": None, "tokens": 6}
    with torch.no_grad():                          # a bug: our lm_head no longer the checkpoint's
        g = torch.Generator().manual_seed(1)
        ours.lm_head.weight.add_(0.5 * torch.randn(ours.lm_head.weight.shape, generator=g))
    bug = measure.engine_vs_transformers(tmp_path / "ckpt", ours, prompt, new_tokens=6, repeats=1)
    assert not bug["identical"] and bug["divergence"]["position"] is not None
    assert bug["divergence"]["near_tie"] is False and bug["divergence"]["max_abs_logit_diff"] > 0.1


def test_the_report_points_to_the_claims_plots_that_exist():
    """The report's pointer to benchmarks/claims names files and a section that are there (a renamed plot or
    heading would leave the report pointing at nothing)."""
    import re

    from nemotron3.run import report

    root = Path(__file__).resolve().parents[2]
    names = re.findall(r"[a-z_]+\.png", report.CLAIMS_NOTE)
    assert len(names) == 4 and all((root / "docs" / "claims" / n).is_file() for n in names), names
    heading = re.search(r'\("(.+?)"\)', report.CLAIMS_NOTE).group(1)
    assert f"## {heading}" in (root / "docs" / "results.md").read_text()
