"""The RL stage: GRPO (and iGRPO) on verifiable rewards, rollouts through the engine with MTP speculation.

    from nemotron3.rl.grpo import GRPOConfig, grpo
    final = grpo(GRPOConfig(model="runs/sft/final", out="runs/rl", steps=120))        # -> runs/rl/final

    nemotron3 rl                                   the embedded default: `nemotron3 sft`'s checkpoint, task prompts
    nemotron3 rl --algo igrpo --rollout-budget 16  iGRPO: 8 drafts + 8 refinements per prompt (rl/igrpo.py)
    nemotron3 rl --data prompts.jsonl --reward-funcs my_rewards:score --reward-funcs tasks --reward-weights 1 0.5
    nemotron3 rl --out runs/rl --save-every 10 --resume

One step (names as TRL's `GRPOConfig` where the concept is the same; docs/post-training.md §6):

    prompts    `prompts_per_step` prompts, fixed by (seed, step) (rl/prompts.py), rendered with the chat
               template and its generation prompt (reasoning on unless `--no-thinking`)
    rollouts   `num_generations` completions each, sampled by the engine from the current weights at
               `temperature`, with lossless MTP speculation on request (`--speculative K`; rl/rollout.py)
    rewards    Σ_f w_f · f(prompts, completions, **columns) (rl/rewards.py; default: the task verifiers)
    advantages group-relative (rl/loss.py): group mean or leave-one-out baseline, `scale_rewards`
    update     `num_iterations` optimizer steps on the batch, each over micro-batches: recompute the
               log-probabilities with a full forward, the clipped ratio loss (`epsilon`, `epsilon_high`,
               `loss_type`), the k3 KL to the frozen starting model when `beta` > 0
    metrics    one JSON line in metrics.jsonl: reward (mean, std, per family), accuracy, KL, clip fractions,
               entropy, completion length, `token_mult_prob_error` (NeMo-RL's: mean exp|logp_train -
               logp_rollout| over completion tokens, 1 when the engine and the trainer agree), rollout tok/s,
               speculative acceptance length, groups with zero reward variance

The engine and the trainer compute the same log-probabilities by different paths (the engine: cached,
fused decode and verify forwards; the trainer: one full forward), so `token_mult_prob_error` measures the
numerical gap between them; with `num_iterations` > 1 the later iterations use the first iteration's
log-probabilities as the old policy's (TRL's `old_per_token_logps`).

The loop, resume, metrics and checkpoints are the training skeleton's (train/stage.py), the step rl/trainer.py's
(rollouts, then the update), the configuration rl/config.py's. Under torchrun the policy is sharded with FSDP2
and rank 0 generates the rollouts from the gathered weights (rl/trainer.py; docs/post-training.md §6).

Layout of `out`, as for `pretrain` and `sft`: metrics.jsonl, step-NNNNNN/ (checkpoint + trainer_state.pt),
final/, summary.json (held-out exact match per family before and after, reasoning on). `--resume` continues
the newest checkpoint bit for bit: a step's prompts and sampling streams depend only on (seed, step) and the
weights, and the optimizer and RNG states are restored. A failing reward function stops the run before the
step's update, with the last checkpoint intact.

The MoE routers' load-balancing bias is not updated during RL (no expert-balance step), and the MTP block is
not trained: speculation stays lossless whatever the drafts are, they are only accepted less often as the
policy drifts from what the MTP block learned (the acceptance length in metrics.jsonl shows it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from nemotron3.eval.accuracy import accuracy_by_mode
from nemotron3.options import to_dict
from nemotron3.rl.config import OPERATIONAL_FIELDS, GRPOConfig
from nemotron3.rl.env_source import EnvRollouts
from nemotron3.rl.trainer import RLRun
from nemotron3.train import stage
from nemotron3.train.summary import print_footer, run_stage

# the config: the CLI finds it here
__all__ = ["OPERATIONAL_FIELDS", "EnvStage", "GRPOConfig", "GRPOStage", "grpo", "main"]


class GRPOStage(RLRun):
    """The `nemotron3 rl` stage: RLRun's step, with held-out exact match before, every --eval-every steps and
    after (rank 0, on the engine's weights), kept in the checkpoints so a resumed run reports the same `before`."""

    def __init__(self, cfg: GRPOConfig, console: Console, source: Path) -> None:
        super().__init__(cfg, console, source)
        self.before: dict = {}
        self.env_before: dict = {}

    def heldout(self, n: int = 0) -> dict[str, float]:
        """Held-out greedy exact match per family, reasoning on (accuracy_by_mode), on the first `n` problems per
        family (0: --eval-problems); {} on ranks other than 0. Every rank calls it (the weights are gathered)."""
        cfg = self.cfg
        if cfg.eval_problems <= 0 or cfg.data:
            return {}
        self.sync()
        if self.rollout_model is None:
            return {}
        res = accuracy_by_mode(self.rollout_model, self.tokenizer, min(n or cfg.eval_problems, cfg.eval_problems),
                               cfg.difficulty, cfg.seed, families=cfg.families or None, modes=["on"])
        self.rollout_model.train()
        return {f: r["accuracy"] for f, r in res["on"].items()}

    def env_heldout(self, n: int, families: dict[str, float]) -> dict[str, dict]:
        """Held-out accuracy per `--env` environment (rl/env_source.py); {} without environments."""
        return {}

    def evaluate(self, step: int) -> dict | None:
        cfg = self.cfg
        n = min(cfg.eval_every_problems or cfg.eval_problems, cfg.eval_problems)
        acc = self.heldout(n)
        if not acc:
            return None
        self.console.print(f"step {step:4d}  [bold]held-out[/] " + "  ".join(f"{f} {a:.0%}" for f, a in acc.items()))
        return {"step": step, "heldout_accuracy": acc, "heldout_problems": n, **env_record(self.env_heldout(n, acc))}

    def state(self) -> dict:
        return {"accuracy_before": self.before, "env_before": self.env_before}

    def load_state(self, resume: dict) -> None:
        self.before = resume.get("accuracy_before", {})
        self.env_before = resume.get("env_before", {})


class EnvStage(EnvRollouts, GRPOStage):
    """`nemotron3 rl --env ...`: the environments' episodes as rollouts (rl/env_source.py), GRPOStage's evaluation."""


def env_record(env: dict[str, dict]) -> dict:
    """A held-out record's per-environment keys: accuracy and tool-call validity ({} without environments)."""
    if not env:
        return {}
    return {"heldout_env_accuracy": {k: v["accuracy"] for k, v in env.items()},
            "heldout_env_valid_fraction": {k: v["valid_fraction"] for k, v in env.items()
                                           if v["valid_fraction"] is not None}}


def env_summary(run: EnvStage, after: dict[str, dict]) -> dict:
    """summary.json's environment keys: weights, and held-out accuracy and tool-call validity before and after."""
    b, a = env_record(run.env_before), env_record(after)
    return {"envs": {e.name: w for e, w in zip(run.envs, run.env_weights)},
            "env_accuracy_before": b.get("heldout_env_accuracy", {}),
            "env_accuracy_after": a.get("heldout_env_accuracy", {}),
            "env_valid_fraction_before": b.get("heldout_env_valid_fraction", {}),
            "env_valid_fraction_after": a.get("heldout_env_valid_fraction", {})}


def grpo(cfg: GRPOConfig, console: Console | None = None) -> Path:
    """Run (or resume) one RL run; returns its `final/` checkpoint folder (see the module docstring)."""
    console = console or Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return stage.launch(cfg, console, OPERATIONAL_FIELDS, lambda start: _run(start, console),
                        reads=lambda c: {"--data": c.data})


def _run(start: stage.Start, console: Console) -> Path:
    cfg, ckpt = start.cfg, start.ckpt
    torch.manual_seed(cfg.seed)
    run = (EnvStage if cfg.env else GRPOStage)(cfg, console, ckpt or cfg.model)
    if start.resume is None:
        t0 = time.perf_counter()
        run.before = run.heldout()
        run.env_before = run.env_heldout(cfg.eval_problems, run.before) if run.before else {}
        if run.before:
            console.print(f"[bold]before RL[/] held-out exact match (reasoning on) measured in "
                          f"{time.perf_counter() - t0:.0f} s: " + "  ".join(f"{f} {a:.0%}"
                                                                          for f, a in run.before.items()))
    algo = "iGRPO" if run.N else "GRPO"
    console.print(f"[bold]model[/] {ckpt or cfg.model}: {run.model.config.pattern}, {run.model.num_parameters():,} "
                  f"parameters; {algo}, {cfg.steps} steps of {cfg.prompts_per_step} prompts x "
                  f"{f'{run.N} drafts + ' if run.N else ''}{run.G} completions; speculative k={run.k}"
                  + (f"; {run.world} ranks" if run.world > 1 else ""))
    run.run(start.resume)
    final = cfg.out / "final"
    run.save_final()
    after = run.heldout()
    env_after = run.env_heldout(cfg.eval_problems, after) if after else {}
    if after:
        run.write({"step": run.step, "heldout_accuracy": after, "heldout_problems": cfg.eval_problems,
                   **env_record(env_after)})
    if run.rank == 0:
        records = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in records if "reward" in r]
        stage.write_summary(cfg.out, {
            "out": str(cfg.out), "final": str(final), "metrics": str(cfg.out / "metrics.jsonl"),
            "model": str(cfg.model), "algo": cfg.algo, "steps": run.step,
            "seconds": round(time.perf_counter() - start.t_start, 1),
            "rollouts_per_prompt": run.N + run.G, "speculative": run.k,
            "accuracy_before": run.before, "accuracy_after": after,
            **(env_summary(run, env_after) if cfg.env else {}),
            "reward_first": steps[0]["reward"] if steps else None,
            "reward_last": steps[-1]["reward"] if steps else None,
            "token_mult_prob_error_max": max((r.get("token_mult_prob_error", 1.0) for r in steps), default=None),
            "rollout_tok_s_mean": (sum(r["rollout_tok_s"] for r in steps) / len(steps)) if steps else None,
            "skipped_steps": [r["step"] for r in steps if r.get("skipped")],
            "config": to_dict(cfg),
        })
    return final


def print_summary(summary: dict, console: Console) -> None:
    """The end-of-run report of `nemotron3 rl`, from its summary.json."""
    console.rule(f"[bold]RL summary ({summary['algo']})")
    console.print(f"{summary['steps']} steps in {summary['seconds']} s; {summary['rollouts_per_prompt']} rollouts per "
                  f"prompt, speculative k={summary['speculative']}, mean rollout "
                  f"{summary['rollout_tok_s_mean'] or 0:.0f} tok/s; reward {summary['reward_first']:.3f} (step 1) -> "
                  f"{summary['reward_last']:.3f} (last); token_mult_prob_error at most "
                  f"{summary['token_mult_prob_error_max'] or 1:.4f}")
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    if after:
        console.print("held-out exact match (reasoning on), before -> after RL")
        for fam, a in after.items():
            b = before.get(fam)
            delta = f"  ({(a - b) * 100:+.0f} points)" if b is not None else ""
            console.print(f"  {fam:10s} {'-' if b is None else f'{b:.0%}':>5s} -> {a:.0%}{delta}")
    if summary.get("env_accuracy_after"):
        console.print("held-out accuracy per environment (greedy), before -> after RL")
        for name, a in summary["env_accuracy_after"].items():
            b = summary["env_accuracy_before"].get(name)
            valid = summary["env_valid_fraction_after"].get(name)
            console.print(f"  {name:10s} {'-' if b is None else f'{b:.0%}':>5s} -> {a:.0%}"
                          + (f"  (tool calls valid {valid:.0%})" if valid is not None else ""))
    print_footer(summary, console)


def main(cfg: GRPOConfig) -> int:
    """`nemotron3 rl`: run, then print the summary."""
    return run_stage(grpo, cfg, print_summary)
