"""Reinforcement learning on verifiable rewards: GRPO and iGRPO (docs/post-training.md §6).

    rewards.py   reward functions with TRL's signature, loaded by name, checked
    prompts.py   the prompt set: the embedded task families or .jsonl prompts with columns
    rollout.py   G sampled completions per prompt through the engine (MTP speculation, logprobs)
    loss.py      group advantages, per-token log-probabilities, the clipped ratio loss
    igrpo.py     iGRPO's draft selection and refinement prompts
    config.py    GRPOConfig: the run's fields (TRL's names) and those a resume may change
    trainer.py   RL on the training skeleton (train/stage.py): a step's rollouts (iGRPO's drafts too), then the update
    multiturn.py episodes of environments (nemotron3/envs) turn by turn through the engine's scheduler
    env_source.py  `--env NAME[:WEIGHT]`: environments' episodes as the rollout source, held-out per environment
    grpo.py      the `nemotron3 rl` stage: held-out evaluation, final/, summary.json

The task families moved to `nemotron3.tasks`; `nemotron3.rl.tasks` stays an alias of it for code written
against nemotron3 0.1.
"""

from nemotron3 import tasks

__all__ = ["tasks"]
