"""Environments as RL's rollout source: `nemotron3 rl --env NAME[:WEIGHT]` (docs/agentic-rl.md §5-6).

    nemotron3 rl --env tasks --env tools:0.5 --max-completion-length 256

    envs, weights = build_envs(["tasks", "tools:0.5"], difficulty=1)     # envs/registry.py, envs/mix.py specs
    heldout_env(engine, tokenizer, env, n=80, seed=0, max_completion_length=256)   # greedy, its eval split

`EnvRollouts` is the rollout source (an override of `RLRun.generate`, rl/trainer.py): each step's
`prompts_per_step` prompts are split over the environments by weight (envs/mix.py `EnvMix`, fixed by (seed,
step)), `num_generations` episodes of each are run turn by turn through the engine (rl/multiturn.py, the sampling
streams of the step's seed; a turn gets at most `--max-turn-tokens`, the episode `--max-completion-length`),
scored by each environment's rubric and handed to the skeleton as a `Rollouts`:
the completion of an episode is every token after its prompt, the model's turns and the environment's replies
alike, with `loss_mask` 1 exactly on the model's tokens, so the loss and `token_mult_prob_error` cover every model
turn and no tool output. The step's record gains envs/mix.py `env_metrics`: `env/<name>/reward`,
`env/<name>/accuracy`, turns, episodes, and `tool_calls/valid_fraction` and the counts of each tool error; its
`accuracy` is the mean of the environments' accuracy functions.

Held-out: the task families' exact match as without `--env` (eval/accuracy.py, per family), and per environment
its accuracy on its eval split (`get_eval_dataset(n, seed)`), greedy: for a task environment the mean of its
families' exact match (the same problems), for any other `heldout_env`'s episodes, with tool-call validity.
Under torchrun rank 0 generates, as for the task prompts (rl/trainer.py); this module only supplies `generate`.
"""

from __future__ import annotations

import math
from dataclasses import replace

from nemotron3.engine import Engine, SamplingParams
from nemotron3.envs import EnvMix, TaskEnv, load_environment, parse_env_specs
from nemotron3.envs.base import Environment
from nemotron3.envs.registry import is_known
from nemotron3.options import derive_seed
from nemotron3.rl.multiturn import episode_metrics, multiturn_rollout, score_episodes
from nemotron3.rl.prompts import PromptRow
from nemotron3.rl.rollout import RolloutBatch
from nemotron3.rl.trainer import RLRun, Rollouts
from nemotron3.tasks import default_families
from nemotron3.tokenizer import Tokenizer


def build_envs(specs: list[str], difficulty: int = 1) -> tuple[list[Environment], list[float]]:
    """The environments of `--env` specs and their weights; one ValueError naming a bad spec."""
    parsed = parse_env_specs(specs, known=is_known)
    return [load_environment(s.name, difficulty) for s in parsed], [s.weight for s in parsed]


def heldout_env(engine: Engine, tokenizer: Tokenizer, env: Environment, n: int, seed: int,
                max_completion_length: int, enable_thinking: bool = True) -> dict:
    """Greedy episodes of `n` problems of the environment's eval split: {"accuracy" (mean of its accuracy
    function, NaN without one), "valid_fraction" (tool calls, None when none was made), "turns", "problems"}."""
    items = [(env, ex) for ex in env.get_eval_dataset(n, seed)]
    was_training = engine.model.training
    engine.model.eval()
    batch = multiturn_rollout(engine, tokenizer, items, 1, SamplingParams(max_tokens=max_completion_length,
                                                                          temperature=0.0),
                              max_completion_length, enable_thinking)
    engine.model.train(was_training)
    metrics = episode_metrics(batch, score_episodes(batch))
    valid = metrics["tool_calls/valid_fraction"]
    return {"accuracy": metrics[f"env/{env.name}/accuracy"], "valid_fraction": None if math.isnan(valid) else valid,
            "turns": metrics[f"env/{env.name}/turns"], "problems": len(items)}


class EnvRollouts(RLRun):
    """RLRun whose rollouts are episodes of the `--env` environments (module docstring). Combined with
    rl/grpo.py's stage as `EnvStage`; `env_heldout` is its per-environment held-out accuracy."""

    def __init__(self, cfg, console, source) -> None:
        super().__init__(cfg, console, source)
        self.envs, self.env_weights = build_envs(cfg.env, cfg.difficulty)
        self.mix = EnvMix(self.envs, self.env_weights, cfg.seed)
        self.turn = replace(self.sampling, max_tokens=cfg.max_turn_tokens or cfg.max_completion_length)

    def generate(self, step: int) -> Rollouts:
        cfg = self.cfg
        items = self.mix.batch(step, cfg.prompts_per_step)
        self.rollout_model.eval()
        eb = multiturn_rollout(self.engine, self.tokenizer, items, self.G,
                               replace(self.turn, seed=derive_seed(cfg.seed, step)), cfg.max_completion_length,
                               cfg.enable_thinking)
        scores = score_episodes(eb)
        batch = RolloutBatch(eb.prompt_ids, eb.completion_ids, eb.logprobs, eb.texts, eb.truncated, eb.stats,
                             loss_mask=[[float(m) for m in mask] for mask in eb.completion_mask])
        rows = [PromptRow(ex.messages, ex.columns) for _, ex in items]
        # one "reward function" column, the environments' accuracy: the step record's `accuracy`
        return Rollouts(rows, batch, scores.rewards, scores.accuracy.view(-1, 1), episode_metrics(eb, scores))

    def env_heldout(self, n: int, families: dict[str, float]) -> dict[str, dict]:
        """{env: heldout_env's dict} on rank 0 ({} elsewhere); a task environment's accuracy is the mean of its
        families' exact match in `families` (heldout()'s, the same held-out problems)."""
        if self.rollout_model is None or n <= 0:
            return {}
        out = {}
        for env in self.envs:
            if isinstance(env, TaskEnv):
                fams = env.families or default_families()
                accs = [families[f] for f in fams if f in families]
                out[env.name] = {"accuracy": sum(accs) / len(accs) if accs else math.nan, "valid_fraction": None,
                                 "turns": 1.0, "problems": n * len(fams)}
            else:
                out[env.name] = heldout_env(self.engine, self.tokenizer, env, n, self.cfg.seed,
                                            self.cfg.max_completion_length, self.cfg.enable_thinking)
        return out
