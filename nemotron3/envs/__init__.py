"""Environments for RL: prompts, episodes turn by turn, tools, rubrics, and mixing several in one run.

    base.py               Environment, SingleTurnEnv, MultiTurnEnv, Rubric, Example, State, run_episode
    tools.py              tools: JSON schemas from signatures and docstrings, calls with a time limit, error messages
    tool_env.py           ToolEnv: replies are the results of the model's tool calls
    task_env.py           the six task families as single-turn environments (rewards unchanged)
    lookup.py             the embedded tool environment `tools` (lookup + calculate) and its SFT conversations
    mix.py                `--env NAME[:WEIGHT]` specs, the per-batch mix by weight, per-environment metrics
    registry.py           environments by name
    verifiers_adapter.py  an installed `verifiers` environment (optional)

Names follow PrimeIntellect's `verifiers` where the concept is the same. This package is below the engine and
training: the runner that samples episodes through the engine is rl/multiturn.py (docs/agentic-rl.md).
"""

from nemotron3.envs.base import (
    ENDINGS,
    Environment,
    Example,
    MultiTurnEnv,
    Rubric,
    SingleTurnEnv,
    State,
    run_episode,
)
from nemotron3.envs.lookup import LookupEnv
from nemotron3.envs.mix import EnvMix, EnvSpec, env_metrics, parse_env_specs
from nemotron3.envs.registry import is_known, load_environment
from nemotron3.envs.task_env import TaskEnv
from nemotron3.envs.tool_env import ToolEnv
from nemotron3.envs.tools import TOOL_ERRORS, call_tool, get_json_schema

__all__ = [
    "ENDINGS", "TOOL_ERRORS", "EnvMix", "EnvSpec", "Environment", "Example", "LookupEnv", "MultiTurnEnv", "Rubric",
    "SingleTurnEnv", "State", "TaskEnv", "ToolEnv", "call_tool", "env_metrics", "get_json_schema", "is_known",
    "load_environment", "parse_env_specs", "run_episode",
]
