"""The stages of `nemotron3 run`, each a function of the run's context that leaves its folder under `out`.

    out/tokenizer/      tokenizer.json (+ tokenizer_config.json with the chat template), summary.json
    out/pretrain/       `nemotron3 pretrain` (NVFP4 recipe, MTP, the end-of-training switch): final/, metrics.jsonl
    out/precision/      twin/: the same run in high precision, stopped early; summary.json: the NVFP4 loss gap
    out/sft/            `nemotron3 sft` from pretrain/final: reasoning on / off / budgets
    out/rl/             `nemotron3 rl` (GRPO) from sft/final
    out/igrpo/          `nemotron3 rl --algo igrpo` from sft/final at the same rollout budget (large budgets only)
    out/eval/           the RL model in every reasoning mode (the RL stage measures `on` itself)
    out/speculative/    MTP acceptance and decode speed-up by k on the RL model
    out/speed/          the engine against transformers on the RL model's weights
    out/quantize/       every quantization scheme of the RL model: accuracy and bytes

A stage is complete when its `summary.json` exists (written last, atomically); a complete stage is skipped
when the run resumes. Since a new run clears what a killed start left in its stage folders, an `--out` that holds
anything of another run (`check_new_run`) is refused; checkpoint folders are written whole (nemotron3/folders.py).
A training stage that was killed resumes from its newest checkpoint (the stages save every few steps), bit for
bit; a measuring stage that was killed starts over. A stage that cannot run here says why (`skip_reason`) and is
listed as skipped in the report; nothing stands in for it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nemotron3 import checkpoint as ckpt  # the checkpoint folder (train.checkpoint is the run's)
from nemotron3 import folders
from nemotron3.config import ModelConfig
from nemotron3.eval.accuracy import accuracy_by_mode, mode_names
from nemotron3.eval.retrieval import cache_bytes, retrieval_accuracy
from nemotron3.options import ConfigError, resolve_device
from nemotron3.rl.config import GRPOConfig
from nemotron3.rl.grpo import grpo
from nemotron3.run import measure
from nemotron3.run.plan import SEEDLM_FROM_MINUTES, STAGES, SWITCH_SHARE, Plan
from nemotron3.stages.pretrain import PretrainConfig, pretrain, tokenizer_sample
from nemotron3.stages.sft import SFTConfig, sft
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint, long_context


@dataclass
class Context:
    """What every stage reads: where the run writes, its plan, and the run-wide choices."""

    out: Path
    plan: Plan
    console: Console
    config: str = "tiny"
    seed: int = 0
    nvfp4: bool = True
    device: str = "auto"  # --device of every stage (options.device_option)

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def summary(self, stage: str) -> dict[str, Any]:
        return json.loads((self.dir(stage) / "summary.json").read_text())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader (or a resumed run) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def check_new_run(out: Path) -> None:
    """A run without run.json in `out` is new, and clears the stage folders a killed start of its own left: refuse
    an `out` that holds another run's files or a folder named like a stage (nothing here wrote them)."""
    marks = folders.run_marks(out) + sorted(f"{n}/" for n in STAGES if (out / n).exists())
    marks += [n for n in ("report.json", "report.md", "timing.json") if (out / n).exists()]
    if marks:
        raise ConfigError(f"--out {out} holds another run ({', '.join(marks)}) that `nemotron3 run` did not write: "
                          "choose another --out")


def _save_every(steps: int) -> int:
    """Checkpoint about every 20 % of a training stage, so that a kill loses little."""
    return max(1, steps // 5)


def _fresh_or_resume(folder: Path) -> bool:
    """True when `folder` holds a checkpoint to resume from; otherwise clear what a killed start left there."""
    checkpoint.clean_temporaries(folder)  # a checkpoint whose save was killed: put it back first
    if checkpoint.latest(folder) is not None:
        return True
    if folder.exists():
        shutil.rmtree(folder)
    return False


# ----------------------------------------------------------------------------------------- training stages
def tokenizer_stage(ctx: Context) -> dict:
    """The byte-level BPE that every later stage shares, trained as `nemotron3 pretrain` would."""
    texts = tokenizer_sample(PretrainConfig(seed=ctx.seed))  # task documents and tool conversations
    tok = Tokenizer.train(texts, ModelConfig.load(ctx.config).vocab_size)
    tok.save(ctx.dir("tokenizer"))
    return {"vocab_size": tok.vocab_size, "documents": len(texts), "path": str(ctx.dir("tokenizer"))}


def _pretrain_config(ctx: Context, nvfp4: bool, out: Path, **kw: Any) -> PretrainConfig:
    p = ctx.plan
    return PretrainConfig(config=ctx.config, steps=p.pretrain_steps, seed=ctx.seed, tokenizer=ctx.dir("tokenizer"),
                          nvfp4=nvfp4, nvfp4_high_precision_tail=SWITCH_SHARE if nvfp4 else 0.0,
                          eval_every=p.eval_every, save_every=_save_every(p.pretrain_steps), keep_last=1,
                          log_every=max(1, p.pretrain_steps // 12), out=out, resume=_fresh_or_resume(out),
                          device=ctx.device, **kw)


def pretrain_stage(ctx: Context) -> dict:
    pretrain(_pretrain_config(ctx, ctx.nvfp4, ctx.dir("pretrain"), eval_problems=ctx.plan.eval_problems),
             ctx.console)
    return ctx.summary("pretrain")


def precision_stage(ctx: Context) -> dict:
    """The NVFP4 loss gap on a matched run: the pretraining run again in high precision (same weights, data
    and schedule), stopped after `plan.twin_steps` steps, against the NVFP4 run's held-out loss at that step."""
    twin = ctx.dir("precision") / "twin"
    pretrain(_pretrain_config(ctx, False, twin, eval_problems=0, stop_after=ctx.plan.twin_steps), ctx.console)
    step = ctx.plan.twin_steps
    nv = dict(map(tuple, ctx.summary("pretrain")["eval_losses"]))
    hp = dict(map(tuple, json.loads((twin / "summary.json").read_text())["eval_losses"]))
    if step not in nv or step not in hp:
        raise RuntimeError(f"no held-out loss at step {step} in both runs (evaluated at {sorted(nv)} and "
                           f"{sorted(hp)})")
    return {"step": step, "steps_of": ctx.plan.pretrain_steps, "nvfp4_eval_loss": nv[step],
            "high_precision_eval_loss": hp[step], "gap_nats": nv[step] - hp[step],
            "gap_relative": (nv[step] - hp[step]) / hp[step], "twin": str(twin)}


RETRIEVAL_BEFORE = (1024, 4096)  # prompt lengths (tokens) measured before the CPT phases
RETRIEVAL_AFTER = (1024, 4096, 16384)  # and after them


def _retrieval(folder: Path, ctx: Context, lengths: tuple[int, ...]) -> dict[str, dict]:
    """Retrieval exact match by length ({str(length): {accuracy, stderr, n, ...}}) of a checkpoint; at 16k and
    beyond a quarter of the problems (each prefill there costs seconds)."""
    model, tok = ckpt.open(folder, ctx.device, require_tokenizer=True)
    n = ctx.plan.cpt_problems
    return {str(k): v for length in lengths
            for k, v in retrieval_accuracy(model, tok, (length,), n if length < 16384 else max(2, n // 4),
                                           seed=ctx.seed).items()}


def cpt_stage(ctx: Context) -> dict:
    """The long-context CPT (train/long_context.py: its measured five-phase curriculum, loss on the questions) from
    the pretrained weights, with retrieval exact match at 1k / 4k before and at 1k / 4k / 16k after, and the cache
    bytes of the hybrid and its attention-only twin at 64k. A side branch: SFT starts from pretrain's final/. A
    CPT in progress starts again (its phases keep no resumable state)."""
    source, out = ctx.dir("pretrain") / "final", ctx.dir("cpt")
    if out.exists():
        shutil.rmtree(out)
    before = _retrieval(source, ctx, RETRIEVAL_BEFORE)
    final = long_context.cpt(source, out, long_context.PHASES, seed=ctx.seed, console=ctx.console)
    after = _retrieval(final, ctx, RETRIEVAL_AFTER)
    config = ckpt.read_config(final)
    return {"before": before, "after": after, "phases": len(long_context.PHASES), "final": str(final),
            "cache_bytes_64k": cache_bytes(config, 65536)}


def sft_stage(ctx: Context) -> dict:
    p, out = ctx.plan, ctx.dir("sft")
    sft(SFTConfig(model=ctx.dir("pretrain") / "final", out=out, steps=p.sft_steps, seed=ctx.seed,
                  eval_problems=p.eval_problems, eval_budgets=list(p.eval_budgets),
                  tool_eval_problems=p.tool_eval_problems,
                  eval_every=max(1, p.sft_steps // 6), save_every=_save_every(p.sft_steps), keep_last=1,
                  log_every=max(1, p.sft_steps // 6), resume=_fresh_or_resume(out), device=ctx.device), ctx.console)
    return ctx.summary("sft")


def _rl(ctx: Context, stage: str, **kw: Any) -> dict:
    p, out = ctx.plan, ctx.dir(stage)
    grpo(GRPOConfig(model=ctx.dir("sft") / "final", out=out, steps=p.rl_steps, seed=ctx.seed,
                    eval_problems=p.eval_problems, eval_every=p.rl_eval_every, eval_every_problems=p.rl_curve_problems,
                    save_every=_save_every(p.rl_steps), keep_last=1,
                    prompts_per_step=p.rl_prompts, temperature=p.rl_temperature, log_every=max(1, p.rl_steps // 12),
                    resume=_fresh_or_resume(out), device=ctx.device, **kw), ctx.console)
    return ctx.summary(stage)


def rl_stage(ctx: Context) -> dict:
    """GRPO on the task families and the tool environment (`--env tasks --env tools:W`, plan.RL_TOOL_WEIGHT): an
    episode gets plan.RL_COMPLETION_TOKENS, a turn (a task completion too) what a completion got before."""
    p = ctx.plan
    return _rl(ctx, "rl", num_generations=p.rl_generations, env=["tasks", f"tools:{p.rl_tool_weight:g}"],
               max_completion_length=p.rl_completion_tokens, max_turn_tokens=GRPOConfig().max_completion_length,
               micro_batch_size=p.rl_micro_batch)


def igrpo_stage(ctx: Context) -> dict:
    """iGRPO at GRPO's rollout budget: of 16 completions per prompt, 8 drafts (the best kept) + 8 refinements."""
    return _rl(ctx, "igrpo", algo="igrpo", rollout_budget=ctx.plan.rl_generations)


# ----------------------------------------------------------------------------------------- measuring stages
def _rl_model(ctx: Context, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Tokenizer, Path]:
    final = ctx.dir("rl") / "final"
    model, tok = ckpt.open(final, resolve_device(ctx.device), dtype, require_tokenizer=True)
    return model, tok, final


def eval_stage(ctx: Context) -> dict:
    """The RL model in the reasoning modes the RL stage does not measure: off and the thinking budgets."""
    p = ctx.plan
    model, tok, _ = _rl_model(ctx)
    modes = [m for m in mode_names(p.eval_budgets) if m != "on"]
    res = accuracy_by_mode(model, tok, p.eval_problems, seed=ctx.seed, budgets=list(p.eval_budgets), modes=modes)
    accuracy = {mode: {f: r["accuracy"] for f, r in fams.items()} for mode, fams in res.items()}
    return {"model": str(ctx.dir("rl") / "final"), "problems_per_family": p.eval_problems, "accuracy": accuracy}


def speculative_stage(ctx: Context) -> dict:
    """MTP speculation on the RL model (and the acceptance of the SFT model's freshly trained heads)."""
    p = ctx.plan
    model, tok, _ = _rl_model(ctx)
    prompts = measure.heldout_chat_prompts(tok, p.spec_prompts, ctx.seed)
    result = measure.speculative_speedup(model, prompts, (1, 2, 3), p.spec_new_tokens)
    from nemotron3.engine import Engine

    sft_model = ckpt.load(ctx.dir("sft") / "final", device=resolve_device(ctx.device))
    g = Engine(sft_model).generate(prompts, p.spec_new_tokens, num_speculative_tokens=3)
    result["sft_acceptance_length_k3"] = g.stats["acceptance_length"]
    return result


def speed_skip() -> str | None:
    return measure.transformers_available()


def speed_stage(ctx: Context) -> dict:
    model, tok, final = _rl_model(ctx)
    prompt = measure.heldout_chat_prompts(tok, 1, ctx.seed)[0]
    return {"model": str(final), **measure.engine_vs_transformers(final, model, prompt,
                                                                  ctx.plan.speed_new_tokens)}


def quantize_skip() -> str | None:
    try:
        import nemotron3.stages.quantize  # noqa: F401
    except ImportError:
        return "`nemotron3 quantize` is not built yet"
    return None


# what each scheme quantizes at inference: the report names it beside the scheme's row
ACTIVATIONS = {"fp32": "fp32", "bf16": "bf16", "nvfp4": "NVFP4 (W4A4)", "fp8": "FP8 per token (W8A8)"}


def load_scheme(path: Path, device: str = "cpu") -> torch.nn.Module:
    """A quantized checkpoint as its scheme runs: weights decoded, and the inputs of the quantized layers
    quantized as the scheme says (nvfp4: W4A4 with the calibrated input scales; fp8: per-token W8A8; the
    weight-only schemes: nothing to emulate). A weights-only load would make the W4A4 row a W4A16 result."""
    return ckpt.load(path, dtype=torch.float32, quantize_activations=True, device=resolve_device(device))


def _accuracy_on(model: torch.nn.Module, tok: Tokenizer, ctx: Context) -> dict[str, float]:
    res = accuracy_by_mode(model, tok, ctx.plan.quant_problems, seed=ctx.seed, modes=["on"])
    return {f: r["accuracy"] for f, r in res["on"].items()}


def quantize_stage(ctx: Context, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Every scheme of `nemotron3 quantize` applied to the RL model, plus its fp32 and bf16 forms: exact match
    (reasoning on, `plan.quant_problems` per family) and the bytes of the weight files. One JSON per scheme in
    the stage's folder, so that a killed stage keeps the schemes it finished."""
    from nemotron3.stages.quantize import SCHEMES, QuantizeConfig, checkpoint_bytes, quantize

    folder = ctx.dir("quantize")
    model, tok, final = _rl_model(ctx)
    rows: dict[str, dict] = {}
    skipped = {} if ctx.plan.seedlm else {s: f"budget under {SEEDLM_FROM_MINUTES:g} minutes" for s in SCHEMES
                                          if s.startswith("seedlm")}
    names = ["fp32", "bf16", *[s for s in SCHEMES if s not in skipped]]
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        done = folder / f"{name}.json"
        if done.is_file():
            rows[name] = json.loads(done.read_text())
            continue
        t0 = time.perf_counter()
        if name == "fp32":
            q, path = model, final
        elif name == "bf16":
            def fill(tmp: Path) -> None:
                ckpt.save(ckpt.load(final, dtype=torch.bfloat16), tmp, tok)

            path = folders.write_folder(folder / "bf16", fill)
            q = ckpt.load(path, dtype=torch.bfloat16, device=resolve_device(ctx.device))
        else:  # an export a killed start of this stage left is replaced
            path = folder / name
            quantize(QuantizeConfig(model=final, out=path, scheme=name, overwrite=True, device=ctx.device), ctx.console)
            q = load_scheme(path, ctx.device)
        row = {"accuracy": _accuracy_on(q, tok, ctx), "bytes": checkpoint_bytes(path), "path": str(path),
               "activations": ACTIVATIONS.get(name, "fp32 (weight-only scheme)"),
               "seconds": round(time.perf_counter() - t0, 1)}
        row["accuracy_mean"] = sum(row["accuracy"].values()) / len(row["accuracy"])
        write_json(done, row)
        rows[name] = row
    if progress:
        progress(len(names), len(names), "")
    return {"model": str(final), "problems_per_family": ctx.plan.quant_problems, "schemes": rows, "skipped": skipped}
