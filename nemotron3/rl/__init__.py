"""Reinforcement learning and the verifiable tasks it trains on (tasks.py; GRPO arrives in a later issue)."""

from nemotron3.rl.tasks import FAMILIES, Problem, extract_answer, family_reward, generate, mixture, reward

__all__ = ["FAMILIES", "Problem", "extract_answer", "family_reward", "generate", "mixture", "reward"]
