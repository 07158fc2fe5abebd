"""The configuration of an RL run (`nemotron3 rl`): `GRPOConfig`, its fields TRL's names where the concept is the
same (docs/post-training.md §6), and the fields a resumed run may change.

    from nemotron3.rl.config import GRPOConfig
    cfg = GRPOConfig(model="runs/sft/final", out="runs/rl", steps=120, algo="igrpo", rollout_budget=16)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nemotron3 import options
from nemotron3.envs.mix import parse_env_specs
from nemotron3.envs.registry import is_known
from nemotron3.options import StageConfig, device_option, fail, option
from nemotron3.rl import igrpo
from nemotron3.rl.loss import LOSS_TYPES, SCALE_REWARDS

# Fields that only decide what is saved, logged or reported, and the launch's layout: a resumed run may change them.
OPERATIONAL_FIELDS = ("eval_every", "save_every", "keep_last", "log_every", "eval_problems", "out", "resume",
                      "threads", "overwrite", "strict_finite", "device", "dp_shard", "ep")


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
    env: list[str] = option([], "environments to roll out, NAME[:WEIGHT], repeatable (--env tasks --env tools:0.5): "
                            "tasks, tools, a task family, verifiers:ID; episodes turn by turn, each scored by its "
                            "environment's rubric (default: the task prompts and --reward-funcs; docs/agentic-rl.md)",
                            metavar="NAME[:WEIGHT]")
    max_turn_tokens: int = option(0, "with --env: tokens per model turn at most (0 = --max-completion-length, which "
                                  "bounds the whole episode: model turns and replies)", min=0)
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
    dp_shard: int = option(0, "ranks that shard the policy, its gradients and optimizer states with FSDP2 under "
                           "torchrun (0 = the world size)", min=0)
    ep: int = option(0, "ranks each MoE layer's routed experts are partitioned over under torchrun (0 = 1)", min=0)
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
        if self.env:
            self.check_env()
        elif self.max_turn_tokens:
            fail(self, "max_turn_tokens", "applies to --env episodes only")

    def check_env(self) -> None:
        """`--env` specs (envs/mix.py: one line naming a bad one) and the flags an environment run replaces."""
        parse_env_specs(self.env, known=is_known)
        for name, given in (("data", self.data), ("families", self.families), ("reward_weights", self.reward_weights),
                            ("reward_funcs", self.reward_funcs != ["tasks"]), ("algo", self.algo != "grpo")):
            if given:
                fail(self, name, "does not apply with --env: the environments give the prompts and their rubrics "
                     "the rewards (iGRPO is single-turn)")

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
