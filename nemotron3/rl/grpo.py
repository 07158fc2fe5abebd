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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nemotron3 import options
from nemotron3.eval.accuracy import accuracy_by_mode
from nemotron3.options import StageConfig, device_of, device_option, fail, option, restore_config, to_dict
from nemotron3.rl import igrpo
from nemotron3.rl.loss import LOSS_TYPES, SCALE_REWARDS, group_advantages
from nemotron3.rl.prompts import PromptRow
from nemotron3.rl.trainer import RLRun
from nemotron3.train import checkpoint
from nemotron3.train.loop import MetricsLog, process_group
from nemotron3.train.summary import print_footer, run_stage

OPERATIONAL_FIELDS = ("eval_every", "save_every", "keep_last", "log_every", "eval_problems", "out", "resume",
                      "threads", "overwrite", "strict_finite", "device")


@dataclass
class GRPOConfig(StageConfig):
    """An RL run: the checkpoint, the prompts and rewards, the rollouts, the GRPO loss and the optimizer.

    Sizes are bounded by this machine's memory (`check_memory`): a completion, a step's completions, one
    forward's logits, and the held-out problems.
    """

    stage = "rl"

    model: Path = option(Path("runs/sft/final"), "checkpoint folder to train (default: the final/ of `nemotron3 "
                         "sft`)", metavar="DIR")
    out: Path = option(Path("runs/rl"), "output folder (metrics.jsonl, step-NNNNNN/, final/, summary.json)")
    resume: bool = option(False, "continue from the newest checkpoint in --out, with its saved configuration")
    strict_finite: bool = option(False, "refuse a checkpoint with NaN or inf in a weight (default: load it, "
                                 "warning once per such tensor)")
    overwrite: bool = option(False, "replace the run already in --out (its final/, step-NNNNNN/, summary.json, "
                             "metrics.jsonl; nothing else)")
    algo: str = option("grpo", "grpo, or igrpo (best-of-N drafts, then GRPO on refinements)",
                       choices=("grpo", "igrpo"))
    steps: int = option(120, "RL steps (rollouts + update)", min=1)
    prompts_per_step: int = option(8, "prompts per step", min=1)
    num_generations: int = option(16, "completions per prompt that train (GRPO's group; iGRPO's refinements)", min=2)
    num_drafts: int = option(8, "iGRPO: drafts per prompt in stage 1 (no gradient)", min=1)
    rollout_budget: int = option(0, "completions per prompt in all (0 = from --num-generations / --num-drafts): "
                                 "GRPO samples this many, iGRPO splits it evenly into drafts and refinements",
                                 min=0)
    max_completion_length: int = option(128, "tokens per completion at most", min=1)
    temperature: float = option(1.0, "rollout sampling temperature (the loss uses the same)", min=0.01)
    top_p: float = option(1.0, "rollout nucleus mass (1 = off: the loss's law is then the sampling law)",
                          min=0.0, max=1.0)
    top_k: int = option(0, "rollout top-k (0 = off)", min=0)
    enable_thinking: bool = option(True, "prompts with reasoning on (the generation prompt opens <think>)")
    max_thinking_tokens: int | None = option(None, "cap each rollout's reasoning at N tokens", min=0, metavar="N")
    speculative: int | None = option(None, "MTP draft tokens per verify forward in rollouts, lossless (0 = off; "
                                     "default: the device's, engine/params.py: off on a CPU, where at rollout batch "
                                     "sizes the verify forward costs about as much per token as plain decoding, "
                                     "benchmarks/rl.py)", min=0, metavar="K")
    lr: float = option(1e-4, "learning rate (constant after warmup)", min=0.0)
    warmup: int = option(2, "warmup steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay of the matrices", min=0.0)
    betas: tuple[float, float] = option((0.9, 0.99), "AdamW betas", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    beta: float = option(0.0, "k3 KL coefficient to the frozen starting model (0 = no reference model)", min=0.0)
    epsilon: float = option(0.2, "lower clip of the ratio: 1 - epsilon", min=0.0, max=1.0)
    epsilon_high: float | None = option(None, "upper clip: 1 + epsilon_high (default: epsilon; DAPO uses 0.28)",
                                        min=0.0)
    loss_type: str = option("dapo", "loss aggregation: grpo (per completion), dapo (per token), dr_grpo",
                            choices=LOSS_TYPES)
    scale_rewards: str = option("group", "advantage scale: group std, batch std, or none", choices=SCALE_REWARDS)
    leave_one_out: bool = option(False, "leave-one-out baseline (NeMo-RL's default) instead of the group mean")
    num_iterations: int = option(1, "optimizer steps per batch of rollouts (mu), old log-probs kept", min=1)
    mask_truncated_completions: bool = option(False, "overlong filtering: no loss on completions cut by "
                                              "--max-completion-length (they still count in the baseline)")
    skip_zero_variance_groups: bool = option(False, "DAPO's dynamic sampling: drop the groups whose rewards are all "
                                             "equal (always counted in metrics)")
    reward_funcs: list[str] = option(["tasks"], "reward functions: 'tasks' (the task verifiers) or module:function",
                                     metavar="SPEC")
    reward_weights: list[float] = option([], "a weight per reward function (default: 1 each)", metavar="W")
    data: list[Path] = option([], "prompt .jsonl files ({'prompt': str or messages, ...columns}; default: the "
                              "embedded task families)", metavar="PATH")
    families: list[str] = option([], "task families to draw prompts from (default: all)", metavar="NAME")
    difficulty: int = option(1, "task difficulty (1 = easiest)", min=1)
    refine_template: str = option(igrpo.DEFAULT_TEMPLATE, "iGRPO's stage-2 user turn ({prompt}, {draft})")
    micro_batch_size: int = option(0, "completions per forward/backward (0 = all at once)", min=0)
    seed: int = option(0, "seed of the prompts and the rollouts' sampling streams", min=0)
    eval_problems: int = option(80, "held-out problems per task family for exact match (reasoning on) before, "
                                "every --eval-every steps, and after (0 = none)", min=0)
    eval_every: int = option(0, "held-out exact match every K steps (0 = before and after only)", min=0)
    eval_every_problems: int = option(0, "held-out problems per family at the --eval-every evaluations (0 = "
                                      "--eval-problems): a cheaper curve between the full before and after", min=0)
    save_every: int = option(0, "checkpoint every K steps (0 = only final/)", min=0)
    keep_last: int = option(2, "training checkpoints kept (0 = all)", min=0)
    log_every: int = option(5, "print a line every K steps", min=1)
    threads: int | None = option(None, "torch intra-op threads (default: torch's; at most the CPUs this process may "
                                 "use)", min=1, max=options.CPU_COUNT)
    device: str = device_option()  # the policy, its reference model, the rollouts' engine and the update

    def validate(self) -> None:
        super().validate()
        self.check_memory()
        if self.algo == "igrpo" and self.rollout_budget:
            igrpo.split_budget(self.rollout_budget)
        if self.algo == "grpo" and self.rollout_budget == 1:
            fail(self, "rollout_budget", "GRPO needs at least 2 completions per prompt")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            fail(self, "reward_weights", f"has {len(self.reward_weights)} weights for {len(self.reward_funcs)} "
                 "reward functions")
        if self.micro_batch_size and self.micro_batch_size > self.prompts_per_step * self.group_sizes()[1]:
            fail(self, "micro_batch_size", "is larger than the completions per step")
        if self.top_p <= 0:
            fail(self, "top_p", "must be in (0, 1]")

    def check_memory(self) -> None:
        """Refuse sizes this machine cannot hold (options.check_fits), before the model is loaded. Lower bounds:
        a completion is max_completion_length token ids and the loss forward's fp32 logits at each position; a
        step holds every completion of its prompts (drafts and trained ones) as ids, and one forward the logits
        of its rows (--micro-batch-size, else all of them)."""
        length = self.max_completion_length
        options.check_fits(self, "max_completion_length", length * (options.TOKEN_BYTES + options.LOGIT_BYTES),
                           f"one completion of {length:,} tokens (its token ids and fp32 logits)")
        drafts, trained = self.group_sizes()
        per_prompt, rows = drafts + trained, self.prompts_per_step * (drafts + trained)
        many = "prompts_per_step" if self.prompts_per_step >= per_prompt else (
            "rollout_budget" if self.rollout_budget else "num_generations" if trained >= drafts else "num_drafts")
        token, logit = options.TOKEN_BYTES, options.LOGIT_BYTES
        ids = rows * length * token
        options.check_fits(self, many, ids + length * logit, f"a step's {rows:,} completions of {length:,} token ids")
        fwd = self.micro_batch_size or self.prompts_per_step * trained
        options.check_fits(self, "micro_batch_size" if self.micro_batch_size else many, ids + fwd * length * logit,
                           f"a step's {rows:,} completions of {length:,} token ids and one forward's fp32 logits over "
                           f"{fwd:,} of them")
        options.check_items(self, "eval_problems")

    def group_sizes(self) -> tuple[int, int]:
        """(drafts N, trained completions G) per prompt; N = 0 for GRPO."""
        if self.algo == "igrpo":
            return igrpo.split_budget(self.rollout_budget) if self.rollout_budget else (self.num_drafts,
                                                                                        self.num_generations)
        return 0, self.rollout_budget or self.num_generations


# ----------------------------------------------------------------------------------------- the run
def grpo(cfg: GRPOConfig, console: Console | None = None) -> Path:
    """Run (or resume) one RL run; returns its `final/` checkpoint folder (see the module docstring)."""
    console = console or Console()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resume, ckpt = None, None
    if cfg.resume:
        ckpt, resume = checkpoint.resume_point(cfg.out)
        cfg = restore_config(cfg, resume.get("run", {}), ckpt, OPERATIONAL_FIELDS)
        console.print(f"[bold]resuming[/] {ckpt} (step {resume['step']}) with the run's saved configuration")
    device_of(cfg)  # a device this machine lacks is refused before --out is touched (RLRun loads onto it)
    checkpoint.prepare_out(cfg.out, cfg.resume, cfg.overwrite, cfg.model, {"--data": cfg.data})
    with process_group() as rank:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("nemotron3 rl runs on one process; launch it without torchrun")
        del rank
        return _run(cfg, console, ckpt, resume, t_start)


def _family_stats(rows: list[PromptRow], n: int, total: torch.Tensor) -> dict:
    fams = [r.columns.get("family") for r in rows for _ in range(n)]
    out = {}
    for f in sorted({f for f in fams if isinstance(f, str)}):
        vals = total[[i for i, x in enumerate(fams) if x == f]]
        out[f"reward/{f}"] = float(vals.nanmean())
        out[f"reward_std/{f}"] = float(vals[~vals.isnan()].std()) if (~vals.isnan()).sum() > 1 else 0.0
    return out


def _heldout(run: RLRun, n: int = 0) -> dict[str, float]:
    """Held-out greedy exact match per family, reasoning on (evaluate.accuracy_by_mode), on the first `n`
    problems per family (0: --eval-problems)."""
    cfg = run.cfg
    if cfg.eval_problems <= 0 or cfg.data:
        return {}
    res = accuracy_by_mode(run.model, run.tokenizer, min(n or cfg.eval_problems, cfg.eval_problems), cfg.difficulty,
                           cfg.seed, families=cfg.families or None, modes=["on"])
    run.model.train()
    return {f: r["accuracy"] for f, r in res["on"].items()}


def _run(cfg: GRPOConfig, console: Console, ckpt: Path | None, resume: dict | None, t_start: float) -> Path:
    torch.manual_seed(cfg.seed)
    run = RLRun(cfg, console, ckpt or cfg.model)
    step = 0
    before: dict = {}
    if resume is not None:
        run.opt.load_state_dict(resume["optimizer"])
        checkpoint.set_rng_state(resume["rng"], run.model)
        step, before = resume["step"], resume.get("accuracy_before", {})
    else:
        t0 = time.perf_counter()
        before = _heldout(run)
        if before:
            console.print(f"[bold]before RL[/] held-out exact match (reasoning on) measured in "
                          f"{time.perf_counter() - t0:.0f} s: " + "  ".join(f"{f} {a:.0%}" for f, a in before.items()))
    algo = "iGRPO" if run.N else "GRPO"
    console.print(f"[bold]model[/] {ckpt or cfg.model}: {run.model.config.pattern}, {run.model.num_parameters():,} "
                  f"parameters; {algo}, {cfg.steps} steps of {cfg.prompts_per_step} prompts x "
                  f"{f'{run.N} drafts + ' if run.N else ''}{run.G} completions; speculative k={run.k}")
    log = MetricsLog(cfg.out / "metrics.jsonl", step if resume is not None else None)
    history: list[dict] = []
    columns = (TextColumn(f"[bold]{algo.lower()}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("rl", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = run.sched.lr(step)
            rows, batch, total, per, extra = run.rollouts(step)
            t_roll = time.perf_counter() - t0
            adv = group_advantages(total, run.G, cfg.scale_rewards, cfg.leave_one_out)
            keep = torch.ones(len(total), dtype=torch.bool)
            if cfg.skip_zero_variance_groups:
                keep = ~adv.zero_std.repeat_interleave(run.G)
            if cfg.mask_truncated_completions and all(batch.truncated[i] for i in keep.nonzero().view(-1).tolist()):
                keep[:] = False  # every kept completion was cut: nothing to learn from
            lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float64)
            record = {"step": step + 1, "reward": float(total.nanmean()),
                      "reward_std": float(total[~total.isnan()].std()) if (~total.isnan()).sum() > 1 else 0.0,
                      **_family_stats(rows, run.G, total)}
            if run.tasks_reward is not None:
                record["accuracy"] = float(per[:, run.tasks_reward].nanmean())
            for j, spec in enumerate(cfg.reward_funcs):
                if len(cfg.reward_funcs) > 1:
                    record[f"rewards/{spec}"] = float(per[:, j].nanmean())
            if bool(keep.any()):
                record.update(run.update(batch, adv.advantages, keep, lr))
            else:
                record["skipped"] = True
            step += 1
            record.update({
                "lr": lr, "completion_length": float(lengths.mean()), "truncated": float(sum(batch.truncated)) /
                len(batch.truncated), "zero_std_groups": int(adv.zero_std.sum()),
                "groups": len(adv.zero_std), "rollout_tok_s": round(batch.stats["tok_s"], 1),
                "rollout_seconds": round(t_roll, 2), "step_seconds": round(time.perf_counter() - t0, 2), **extra})
            if "acceptance_length" in batch.stats:
                record["acceptance_length"] = round(batch.stats["acceptance_length"], 3)
            log.write(record)
            history.append(record)
            info = f"reward {record['reward']:.3f} {record['rollout_tok_s']:.0f} tok/s"
            bar.update(task, completed=step, info=info)
            if step % cfg.log_every == 0 or step == 1:
                console.print(f"step {step:4d}  reward {record['reward']:.3f}  "
                              f"acc {record.get('accuracy', float('nan')):.3f}  len {record['completion_length']:.0f}  "
                              f"mult_prob_err {record.get('token_mult_prob_error', float('nan')):.4f}  "
                              f"clip {record.get('clip_region', 0):.3f}  zero-std {record['zero_std_groups']}/"
                              f"{record['groups']}  rollout {record['rollout_tok_s']:.0f} tok/s")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                acc = _heldout(run, cfg.eval_every_problems)
                if acc:
                    log.write({"step": step, "heldout_accuracy": acc,
                               "heldout_problems": min(cfg.eval_every_problems or cfg.eval_problems,
                                                       cfg.eval_problems)})
                    console.print(f"step {step:4d}  [bold]held-out[/] " + "  ".join(f"{f} {a:.0%}"
                                                                                   for f, a in acc.items()))
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                state = {"step": step, "optimizer": run.opt.state_dict(), "schedule": asdict(run.sched),
                         "rng": checkpoint.rng_state(run.model), "run": to_dict(cfg), "accuracy_before": before}
                checkpoint.save(checkpoint.step_dir(cfg.out, step), run.model, run.tokenizer, state)
                checkpoint.prune(cfg.out, cfg.keep_last)
    final = cfg.out / "final"
    checkpoint.save(final, run.model, run.tokenizer)
    after = _heldout(run)
    if after:
        log.write({"step": step, "heldout_accuracy": after, "heldout_problems": cfg.eval_problems})
    records = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "reward" in r]
    summary = {
        "out": str(cfg.out), "final": str(final), "metrics": str(cfg.out / "metrics.jsonl"), "model": str(cfg.model),
        "algo": cfg.algo, "steps": step, "seconds": round(time.perf_counter() - t_start, 1),
        "rollouts_per_prompt": run.N + run.G, "speculative": run.k,
        "accuracy_before": before, "accuracy_after": after,
        "reward_first": steps[0]["reward"] if steps else None, "reward_last": steps[-1]["reward"] if steps else None,
        "token_mult_prob_error_max": max((r.get("token_mult_prob_error", 1.0) for r in steps), default=None),
        "rollout_tok_s_mean": (sum(r["rollout_tok_s"] for r in steps) / len(steps)) if steps else None,
        "skipped_steps": [r["step"] for r in steps if r.get("skipped")],
        "config": to_dict(cfg),
    }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    print_footer(summary, console)


def main(cfg: GRPOConfig) -> int:
    """`nemotron3 rl`: run, then print the summary."""
    return run_stage(grpo, cfg, print_summary)
