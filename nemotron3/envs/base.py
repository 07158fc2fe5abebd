"""The environment interface: a dataset of prompts, an episode run turn by turn, a rubric that scores it.

    env = LookupEnv()                                   # or TaskEnv(), or your own subclass
    examples = env.get_dataset(8, seed=0)               # Example(messages, columns): prompts with dataset columns
    state = env.init_state(examples[0])                 # the conversation so far, turns, counters
    replies = env.step(state, text, "tool_call")        # the model's turn in; tool / user turns out; state.done
    state = run_episode(env, examples[0], policy)       # the same loop on text, for a scripted policy

Names follow `verifiers` (PrimeIntellect) where the concept is the same: `Environment`, `SingleTurnEnv`,
`MultiTurnEnv` (`env_response`, `is_completed`, `setup_state`, `max_turns`), `ToolEnv` (envs/tool_env.py),
`Rubric` (`funcs`, `weights`, `add_reward_func`, `add_metric`), `get_dataset` / `get_eval_dataset`. Unlike
verifiers the interface is synchronous, and the model's side (sampling, tokens, the loss mask) is not here: the
engine runner is rl/multiturn.py, which calls only `init_state`, `step` and the rubric. docs/agentic-rl.md §1.

A turn ends in one of `ENDINGS`: `end_of_turn` (the model wrote `<|im_end|>`), `tool_call` (it wrote
`</tool_call>`: generation stops there so the call can run), `eos` (`</s>`) or `length` (its token budget ran
out). After the model's turn `step` records it as an assistant message whose `content` is the raw text the model
wrote (reasoning, `</think>`, content, tool-call XML; as single-turn RL's completions are), then:

    eos or length                  -> done (stop_reason "eos" / "length")
    is_completed(state)            -> done ("completed")
    turns == max_turns             -> done ("max_turns"); the last turn's calls are neither run nor counted
    else                           -> env_response(state): tool or user messages, appended; the episode goes on

Rewards are TRL's reward functions, `f(prompts, completions, **columns) -> list[float | None]`, the signature
`nemotron3 rl --reward-funcs` takes (rl/rewards.py, which also combines them: Σ w_f r_f, checked). For an episode
the prompt is the example's messages and the completion the messages after them: assistant turns (raw text, and
the parsed `tool_calls` of the valid ones) and the environment's replies; the columns are the example's.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., list]
ENDINGS = ("end_of_turn", "tool_call", "eos", "length")
STOP_REASONS = ("completed", "max_turns", "eos", "length")
REPLY_ROLES = ("tool", "user")


@dataclass
class Rubric:
    """Reward functions and their weights (the reward is Σ w_f r_f); a metric is a function of weight 0, logged
    but not rewarded. `accuracy`: the 0/1 correctness function whose mean is the environment's accuracy."""

    funcs: list[RewardFn] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    accuracy: RewardFn | None = None

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = [1.0] * len(self.funcs)
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"rubric: {len(self.weights)} weights for {len(self.funcs)} reward functions")

    def add_reward_func(self, func: RewardFn, weight: float = 1.0) -> None:
        self.funcs.append(func)
        self.weights.append(weight)

    def add_metric(self, func: RewardFn) -> None:
        self.add_reward_func(func, 0.0)

    @property
    def names(self) -> list[str]:
        return [getattr(f, "__name__", type(f).__name__) for f in self.funcs]


@dataclass
class Example:
    """One prompt of an environment's dataset: the conversation to answer and its columns (passed to the rubric,
    one value per completion, as TRL passes dataset columns)."""

    messages: list[dict]
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    """One episode: the conversation so far (the prompt, then every turn), model turns taken, whether it is over
    and why, counters (tool calls: `valid`, `invalid`, and each kind of tool error), the environment's own data."""

    example: Example
    messages: list[dict]
    turns: int = 0
    done: bool = False
    stop_reason: str | None = None
    counts: collections.Counter = field(default_factory=collections.Counter)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def completion(self) -> list[dict]:
        """The messages after the prompt: what the rubric scores."""
        return self.messages[len(self.example.messages):]


class Environment:
    """An environment (module docstring). Subclasses give `get_dataset` (and `get_eval_dataset` for held-out
    prompts) and, when multi-turn, `env_response` and `is_completed`."""

    name = "env"

    def __init__(self, rubric: Rubric | None = None, max_turns: int = 1, system_prompt: str | None = None,
                 tool_defs: list[dict] | None = None) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.rubric = rubric or Rubric()
        self.max_turns = max_turns
        self.system_prompt = system_prompt
        self.tool_defs = tool_defs  # JSON schemas the chat template renders into the system turn

    # ------------------------------------------------------------------ data
    def get_dataset(self, n: int, seed: int) -> list[Example]:
        """`n` training prompts, a pure function of (the environment's settings, n, seed)."""
        raise NotImplementedError

    def get_eval_dataset(self, n: int, seed: int = 0) -> list[Example]:
        """`n` held-out prompts (disjoint from training where the environment can tell)."""
        raise NotImplementedError

    def format_prompt(self, text: str) -> list[dict]:
        """A question as the prompt's messages, after the system prompt if there is one."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": text}]

    # ------------------------------------------------------------------ episodes
    def setup_state(self, state: State) -> None:
        """Per-episode set-up (e.g. the facts a tool reads)."""

    def is_completed(self, state: State) -> bool:
        """Whether the model's last turn ends the episode (checked before `env_response`)."""
        return False

    def env_response(self, state: State) -> list[dict]:
        """The environment's answer to the model's last turn: tool or user messages."""
        raise NotImplementedError

    def init_state(self, example: Example) -> State:
        state = State(example, [dict(m) for m in example.messages])
        self.setup_state(state)
        return state

    def step(self, state: State, text: str, ending: str) -> list[dict]:
        """Record the model's turn (`text` as written, `ending` one of ENDINGS) and return the environment's
        replies ([] once the episode is over; `state.done` and `state.stop_reason` say so)."""
        if state.done:
            raise ValueError("the episode is over; start a new one with init_state")
        if ending not in ENDINGS:
            raise ValueError(f"ending must be one of {', '.join(ENDINGS)}, got {ending!r}")
        state.turns += 1
        state.messages.append({"role": "assistant", "content": text})
        reason = ending if ending in ("eos", "length") else "completed" if self.is_completed(state) else \
            "max_turns" if state.turns >= self.max_turns else None
        if reason is not None:
            state.done, state.stop_reason = True, reason
            return []
        replies = self.env_response(state)
        for i, m in enumerate(replies):
            if not isinstance(m, dict) or m.get("role") not in REPLY_ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"environment {self.name}: reply {i} must be a tool or user message with a string "
                                 f"content, got {m!r}"[:200])
        if not replies:
            raise ValueError(f"environment {self.name}: env_response gave no message for an episode that goes on")
        state.messages += replies
        return replies


class SingleTurnEnv(Environment):
    """One model turn, then the rubric: every single-turn task (the task families, envs/task_env.py)."""

    def __init__(self, rubric: Rubric | None = None, system_prompt: str | None = None) -> None:
        super().__init__(rubric, max_turns=1, system_prompt=system_prompt)

    def is_completed(self, state: State) -> bool:
        return True


class MultiTurnEnv(Environment):
    """Turns until `is_completed` or `max_turns`; subclasses give `env_response`."""

    def __init__(self, rubric: Rubric | None = None, max_turns: int = 8, system_prompt: str | None = None,
                 tool_defs: list[dict] | None = None) -> None:
        super().__init__(rubric, max_turns=max_turns, system_prompt=system_prompt, tool_defs=tool_defs)


Policy = Callable[[list[dict]], tuple[str, str]]


def run_episode(env: Environment, example: Example, policy: Policy) -> State:
    """One episode with a text-level policy: `policy(messages) -> (text, ending)` is asked for each model turn
    (a scripted policy in the tests; the engine runner in rl/multiturn.py does the same with tokens)."""
    state = env.init_state(example)
    while not state.done:
        text, ending = policy(state.messages)
        env.step(state, text, ending)
    return state
