"""The run report says only what it measured (issue 28): W4A4 rows with quantized activations, accuracy with its
binomial standard error, the RL held-out curve, labels that do not overlap, and where the engine and transformers
part. Fast pieces only; tests/test_run.py runs the whole pipeline."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import TINY_HF_CONFIGS, randomize_
from rich.console import Console
from safetensors.torch import load_file

import nemotron3
from nemotron3 import ModelConfig
from nemotron3.engine import Engine
from nemotron3.evaluate import greedy_generate_reference
from nemotron3.model.moe import Experts
from nemotron3.quant.nvfp4 import nvfp4_quantize
from nemotron3.quantize import QuantizeConfig, quantize
from nemotron3.run import stages
from nemotron3.run.plan import RL_CURVE_EVALS, RL_CURVE_PROBLEMS, plan
from nemotron3.train.tokenizer import Tokenizer


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
    model = nemotron3.load_pretrained(folder, dtype=torch.float32)
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
    from test_sft import small_model

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
                              eval_every_problems=1, log_every=100, speculative=-1)
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
