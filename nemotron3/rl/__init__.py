"""Reinforcement learning on verifiable rewards (GRPO and iGRPO arrive here; docs/architecture.md §10).

The task families moved to `nemotron3.tasks`; `nemotron3.rl.tasks` stays an alias of it for code written
against nemotron3 0.1.
"""

from nemotron3 import tasks

__all__ = ["tasks"]
