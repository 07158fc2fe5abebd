"""The budget rule of `nemotron3 run`: how many minutes become how much work in each stage.

The rule is a fixed function of the budget, not of the machine: the same `--budget-minutes` trains the same
model anywhere (a faster machine finishes sooner), and a larger budget buys more of what improves the model,
never the same work done slower. It was set on the reference machine (2 CPU cores, no GPU), where the default
20 minutes runs the whole recipe:

    stage         work at the default 20 min              scales with the budget B (minutes)
    tokenizer     BPE on 4,000 task documents             fixed
    pretrain      300 NVFP4 steps of 16 x 256 tokens (5 %  steps = 15 B; the last 18 % unquantized (the switch)
                  of them tool conversations)
    precision     the high-precision twin, 30 % of them   the same share of the pretraining steps
    cpt           (from B = 40) the long-context CPT      fixed: its five phases (train/long_context.py), ~10
                  phases from the pretrained weights,     minutes taken off B before the other stages are sized;
                  retrieval by length before and after    a side branch (SFT starts from pretrain's final/)
    sft           660 steps of 16 conversations (10 %     steps = 30 B x 1.1 (the tool conversations' share)
                  tool conversations), tool episodes
    rl            200 GRPO steps of 8 prompts x 16,       steps = 10 B; from B = 40 iGRPO runs beside GRPO and the
                  sampled at temperature 0.7, 1 in 33 a   two split them (5 B each); under 1 minute 4 prompts x 8
                  tool-environment prompt (--env tools)
                  held-out exact match before and after   the curve: 4 evaluations inside the stage, evenly
                  (the eval problems), and 4 times in     spaced, on the first min(20, eval) problems per family
                  between (20 per family)
    eval          RL model: reasoning off, 2 budgets      held-out problems per family = min(80, 4 B)
    speculative   k = 1..3 against plain decoding         prompts = min(16, B), at least 2
    speed         engine against transformers             new tokens = 128
    quantize      every scheme, exact match per scheme    problems per family = min(40, 2 B), at least 2;
                                                          SeedLM (a seed search per block) from B = 10
    report        plots, report.md / .html / .json        fixed

About 30 % of the default budget goes to pretraining (with its twin), over half to post-training (RL about 35 %,
SFT about 20 %) and the rest to measuring and exporting. SFT gets twice the steps it had (660, was 330): from the
same pretrained model, 660 steps gave a mean held-out exact match of 35 % against 16.5 % at 330 (sort 45 against
5 %), more than RL's 240 steps added after it (+0.3 points; docs/results.md), so RL gave up 40 of its steps.
Rollouts are sampled at temperature 0.7, not TRL's 1.0: at 1.0 the small model's sampled completions are right
only 2-10 % of the time (greedy: 11-36 %), most groups then have no reward variance and RL barely moves
(RL_TEMPERATURE).
The stage estimates below (seconds on the reference machine) drive only the time-left display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

REFERENCE_MINUTES = 20.0
STAGES = ("tokenizer", "pretrain", "precision", "cpt", "sft", "rl", "igrpo", "eval", "speculative", "speed", "quantize",
          "report")
IGRPO_FROM_MINUTES = 40.0  # iGRPO runs beside GRPO from this budget up
CPT_FROM_MINUTES = 40.0  # the long-context CPT phases (and retrieval by length) from this budget up
CPT_MINUTES = 10.0  # what they take on the reference machine, taken off the budget before the other stages are sized
SEEDLM_FROM_MINUTES = 10.0  # the SeedLM schemes (a minute of seed search each on 2 cores) from this budget up
MAX_EVAL_PROBLEMS = 80  # the most held-out problems the easiest modpow difficulty has
TWIN_SHARE = 0.3  # the high-precision twin trains this share of the pretraining steps (inside the stable phase)
RL_TEMPERATURE = 0.7  # rollout temperature of the RL stages (see above)
SWITCH_SHARE = 0.18  # NVFP4 end-of-training switch: the last 18 % of the pretraining steps in high precision
# The largest budget (about two years): the stages' sizes grow linearly with it and stay far inside 64 bits (each
# stage then checks that its own sizes fit in memory); 15 x 1e308 would overflow the float arithmetic itself.
MAX_BUDGET_MINUTES = 1_000_000
RL_CURVE_EVALS = 4  # held-out evaluations inside each RL stage, evenly spaced, between the full before and after
# The tool environment in the rl stage: tools:W beside the six task families at weight 1, a share W / (1 + W) of
# the prompts: 0.24 of the 8 per step at W = 1/32, a tool prompt every 4 steps or so (~60 in the default run, ~930
# episodes). Its episodes (~180 tokens after a ~280-token prompt) need --max-completion-length 256 (a turn, and so
# a task completion, keeps the 128 of before: --max-turn-tokens), and the update runs one group per forward so task
# rows are not padded to them. The weight is small because a tool prompt's 16
# episodes cost about what a step's whole update does: each of an episode's ~4 turns prefills the conversation
# again (~1,500 tokens an episode, rl/multiturn.py), and the default run had 1.4 minutes to spare (docs/results.md).
RL_TOOL_WEIGHT = 0.03125
# SFT's tool conversations (`nemotron3 sft --tool-share`, 0.1 of the task conversations' count) take steps from the
# task conversations: at 300 steps sort after SFT fell from 2-32 % (without them; seeds 0-2) to 0-2 % (7 runs);
# with 330 steps (every task conversation of the 300-step run still seen) it was 12 % (one seed; 16 % without tools,
# 1 % at 300 steps; docs/results.md). So the steps grow by that share.
SFT_TOOL_SHARE = 0.1
RL_COMPLETION_TOKENS = 256
RL_CURVE_PROBLEMS = 20  # problems per family at those (the first of the full set): about 4 points s.e. on the mean


@dataclass(frozen=True)
class Plan:
    """Every stage's size for one budget (see the module docstring for the rule)."""

    budget_minutes: float
    pretrain_steps: int
    twin_steps: int
    sft_steps: int
    rl_steps: int
    igrpo: bool
    eval_problems: int
    quant_problems: int
    spec_prompts: int
    seedlm: bool = True
    cpt: bool = False
    cpt_problems: int = 0  # retrieval problems per length (1k and 4k; a quarter of them at 16k)
    rl_prompts: int = 8
    rl_generations: int = 16
    rl_temperature: float = RL_TEMPERATURE
    rl_tool_weight: float = RL_TOOL_WEIGHT  # the rl stage's `--env tasks --env tools:W` (issue 34)
    rl_completion_tokens: int = RL_COMPLETION_TOKENS
    rl_micro_batch: int = 0  # completions per forward of the update: one group, so task rows are not padded to tools'
    tool_eval_problems: int = 2  # the tool environment's held-out episodes after SFT
    spec_new_tokens: int = 96
    speed_new_tokens: int = 128
    eval_budgets: tuple[int, ...] = (8, 24)
    seconds: dict[str, float] = field(default_factory=dict)  # estimated seconds per stage on the reference

    @property
    def rl_eval_every(self) -> int:
        """Steps between the RL stages' held-out evaluations: RL_CURVE_EVALS of them strictly inside the stage
        (fewer when it has fewer steps)."""
        return max(1, -(-self.rl_steps // (RL_CURVE_EVALS + 1)))

    @property
    def rl_curve_problems(self) -> int:
        return min(RL_CURVE_PROBLEMS, self.eval_problems)

    @property
    def eval_every(self) -> int:
        """Held-out loss every this many pretraining steps: 10 points on each curve, twin steps included."""
        return max(1, math.gcd(self.twin_steps, max(1, self.pretrain_steps // 10)))


def _round(x: float, to: int = 1, at_least: int = 1) -> int:
    return max(at_least, int(round(x / to)) * to)


def plan(budget_minutes: float, pretrain_steps: int = 0) -> Plan:
    """The plan for `budget_minutes` (`pretrain_steps` > 0 overrides the rule's pretraining steps)."""
    if not 0 < budget_minutes <= MAX_BUDGET_MINUTES:  # NaN fails this too
        raise ValueError(f"budget_minutes must be positive and at most {MAX_BUDGET_MINUTES:,}, got {budget_minutes}")
    cpt = budget_minutes >= CPT_FROM_MINUTES
    b = budget_minutes - CPT_MINUTES if cpt else budget_minutes  # the rest of the stages are sized on what is left
    pre = pretrain_steps or _round(15 * b, 10 if b >= 4 else 1, 4)
    twin = _round(TWIN_SHARE * pre, 1, 2)
    sft = _round(30 * b * (1 + SFT_TOOL_SHARE), 10 if b >= 4 else 1, 4)
    igrpo = budget_minutes >= IGRPO_FROM_MINUTES
    rl = _round((5 if igrpo else 10) * b, 1, 2)  # per RL stage: GRPO and iGRPO share the RL steps
    eval_problems = min(MAX_EVAL_PROBLEMS, _round(4 * b, 1, 2))
    quant_problems = min(40, _round(2 * b, 1, 2))
    spec_prompts = min(16, _round(b, 1, 2))
    seconds = {  # reference machine, quiet: seconds per unit of work, measured on the default run
        "tokenizer": 3.0,
        "pretrain": 1.0 * pre + 0.03 * eval_problems * 6,
        "precision": 0.65 * twin,
        "cpt": 60.0 * CPT_MINUTES if cpt else 0.0,
        "sft": 0.5 * sft + 0.6 * eval_problems * 2,
        "rl": 2.0 * rl + 0.25 * (eval_problems * 2 + min(RL_CURVE_PROBLEMS, eval_problems) * RL_CURVE_EVALS),
        "igrpo": (2.0 * rl + 0.25 * (eval_problems * 2 + min(RL_CURVE_PROBLEMS, eval_problems) * RL_CURVE_EVALS))
        if igrpo else 0.0,
        "eval": 0.4 * eval_problems,
        "speculative": 1.5 * spec_prompts,
        "speed": 30.0,
        "quantize": 10.0 * max(1.0, quant_problems / 10) * 9 + (90.0 if b >= SEEDLM_FROM_MINUTES else 0.0),
        "report": 10.0,
    }
    small = b < 1
    return Plan(budget_minutes, pre, twin, sft, rl, igrpo, eval_problems, quant_problems, spec_prompts,
                seedlm=b >= SEEDLM_FROM_MINUTES, cpt=cpt, cpt_problems=min(20, eval_problems) if cpt else 0,
                rl_prompts=4 if small else 8, rl_generations=8 if small else 16,
                rl_micro_batch=8 if small else 16, tool_eval_problems=min(40, eval_problems), seconds=seconds)
