"""One RL run's working parts: the policy and its engine, the prompts and rewards, and the two halves of a step.

    run = RLRun(cfg, console, source)          # cfg: rl/grpo.py's GRPOConfig
    rows, batch, rewards, per_fn, extra = run.rollouts(step)
    metrics = run.update(batch, advantages, keep, lr)

`rollouts` renders the step's prompts with the chat template, samples G completions each through the engine
(after iGRPO's stage 1: N drafts, the best one written into the refinement prompt) and scores them.
`update` runs `num_iterations` optimizer steps on the kept completions: full-forward log-probabilities, the
clipped ratio loss over micro-batches, `token_mult_prob_error` against the engine's own log-probabilities,
and `Engine.weights_updated()` after each step. The loop around them, the metrics and checkpoints are in
rl/grpo.py; the arithmetic in rl/loss.py (docs/post-training.md §6).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from nemotron3.engine import Engine, SamplingParams
from nemotron3.engine.params import has_mtp, speculative_config
from nemotron3.engine.sampling import derive_seed
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.hf import load_pretrained
from nemotron3.options import ConfigError, device_of
from nemotron3.rl import igrpo, rewards
from nemotron3.rl.loss import completion_logprobs, policy_loss
from nemotron3.rl.prompts import FilePrompts, PromptRow, TaskPrompts
from nemotron3.rl.rollout import RolloutBatch, rollout
from nemotron3.tokenizer import Tokenizer
from nemotron3.train.optim import WSD, build_optimizer

if TYPE_CHECKING:
    from nemotron3.rl.grpo import GRPOConfig


class RLRun:
    """What one RL run holds (the policy, its tokenizer and engine, the prompts, rewards and optimizer) and
    what it does each step: `rollouts(step)` (iGRPO's drafts first when it has any) and `update(...)`."""

    def __init__(self, cfg: GRPOConfig, console: Console, source: Path) -> None:
        self.cfg, self.console = cfg, console
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(f"model (--model) {source} is not a checkpoint folder (no config.json)")
        self.tokenizer = Tokenizer.from_folder(source)
        device = device_of(cfg)
        self.model = load_pretrained(source, dtype=torch.float32, strict_finite=cfg.strict_finite,
                                     dequantize=True, device=device)  # trained: dense (packed is inference-only)
        self.N, self.G = cfg.group_sizes()
        self.prompts = FilePrompts(cfg.data, cfg.seed) if cfg.data else TaskPrompts(cfg.families or None,
                                                                                    cfg.difficulty, cfg.seed)
        self.reward_fns = [rewards.load(s) for s in cfg.reward_funcs]
        self.weights = list(cfg.reward_weights) or [1.0] * len(self.reward_fns)
        self.tasks_reward = cfg.reward_funcs.index("tasks") if "tasks" in cfg.reward_funcs else None
        if cfg.speculative and not has_mtp(self.model):
            raise ConfigError(f"--speculative {cfg.speculative}: {source} has no MTP block")
        self.spec = speculative_config(self.model, cfg.speculative)  # None: the device's default
        self.k = self.spec.k
        self.params = SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                     top_k=cfg.top_k, top_p=cfg.top_p, num_speculative_tokens=self.k,
                                     max_thinking_tokens=cfg.max_thinking_tokens)
        self.context = self.model.config.max_position_embeddings
        self.engine = Engine(self.model, max_seq_len=self.context,
                             think_tokens=ThinkTokens.from_tokenizer(self.tokenizer))
        self.reference = None
        if cfg.beta > 0:  # the frozen starting policy; on resume, the run's --model
            self.reference = load_pretrained(cfg.model, dtype=torch.float32, strict_finite=cfg.strict_finite,
                                             dequantize=True, device=device)
            self.reference.eval().requires_grad_(False)
        self.opt = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.sched = WSD(cfg.lr, cfg.steps, cfg.warmup, 0.0, 1.0, "linear")

    # ------------------------------------------------------------------ rollouts
    def encode(self, rows: list[PromptRow]) -> list[list[int]]:
        """Each conversation rendered with the generation prompt, as ids after <s>; a prompt that leaves no
        room for a completion in the context is an error naming it."""
        out = []
        for i, row in enumerate(rows):
            text = self.tokenizer.render(row.messages, add_generation_prompt=True,
                                         enable_thinking=self.cfg.enable_thinking)
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
            if len(ids) + self.cfg.max_completion_length + self.spec.room > self.context:
                raise ValueError(f"prompt {i} {row.label} has {len(ids)} tokens: with --max-completion-length "
                                 f"{self.cfg.max_completion_length} it does not fit the model's context "
                                 f"({self.context} tokens)")
            out.append(ids)
        return out

    def sample(self, prompt_ids: list[list[int]], n: int, seed: int) -> RolloutBatch:
        self.model.eval()
        return rollout(self.engine, self.tokenizer, prompt_ids, n, replace(self.params, seed=seed))

    def score(self, rows: list[PromptRow], batch: RolloutBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of a rollout batch whose completions come `n` per row of `rows`."""
        prompts = [r.messages for r in rows for _ in range(n)]
        completions = [[{"role": "assistant", "content": t}] for t in batch.texts]
        names = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows for _ in range(n)] for k in names}
        columns["completion_ids"] = batch.completion_ids
        return rewards.score(self.reward_fns, self.weights, prompts, completions, columns)

    def rollouts(self, step: int) -> tuple[list[PromptRow], RolloutBatch, torch.Tensor, torch.Tensor, dict]:
        """The step's prompts, the G completions that train and their rewards (and per-function values)."""
        cfg = self.cfg
        rows = self.prompts.batch(step, cfg.prompts_per_step)
        if not rows:
            raise ValueError("the prompt set gave no prompts")
        seed = derive_seed(cfg.seed, step)
        extra: dict = {}
        prompt_ids = self.encode(rows)
        if self.N:  # iGRPO stage 1: drafts, no gradient; keep each prompt's best
            drafts = self.sample(prompt_ids, self.N, seed)
            draft_rewards, _ = self.score(rows, drafts, self.N)
            best = igrpo.best_drafts(draft_rewards, self.N)
            texts = [drafts.texts[i * self.N + b] for i, b in enumerate(best)]
            refine = [PromptRow(igrpo.refinement_messages(r.messages, igrpo.draft_answer(t), cfg.refine_template),
                                r.columns) for r, t in zip(rows, texts)]
            prompt_ids = self.encode(refine)
            best_r = draft_rewards.view(-1, self.N).nan_to_num(-math.inf).max(-1).values
            extra = {"draft_reward": float(draft_rewards.nanmean()), "best_draft_reward": float(best_r.mean()),
                     "draft_tok_s": drafts.stats["tok_s"], "draft_seconds": drafts.stats["seconds"]}
            seed += 500_009  # the refinements' streams differ from the drafts'
        batch = self.sample(prompt_ids, self.G, seed)
        total, per = self.score(rows, batch, self.G)
        return rows, batch, total, per, extra

    # ------------------------------------------------------------------ the update
    def update(self, batch: RolloutBatch, adv: torch.Tensor, keep: torch.Tensor, lr: float) -> dict:
        """`num_iterations` optimizer steps on the kept completions; returns the step's loss metrics."""
        cfg, model = self.cfg, self.model
        dev = next(model.parameters()).device
        for g in self.opt.param_groups:
            g["lr"] = lr
        idx = keep.nonzero().view(-1).tolist()
        prompts = [batch.prompt_ids[i] for i in idx]
        comps = [batch.completion_ids[i] for i in idx]
        kept = [0.0 if (cfg.mask_truncated_completions and batch.truncated[i]) else 1.0 for i in idx]
        loss_mask = torch.tensor(kept, device=dev)
        A = adv[idx].to(dev)
        mb = cfg.micro_batch_size or len(idx)
        chunks = [list(range(s, min(s + mb, len(idx)))) for s in range(0, len(idx), mb)]
        n_items = float(sum(len(comps[j]) * kept[j] for j in range(len(idx))))
        T = max(len(c) for c in comps)
        old = torch.zeros(len(idx), T, device=dev)
        ref = torch.zeros(len(idx), T, device=dev) if self.reference is not None else None
        model.train()
        if cfg.num_iterations > 1 or ref is not None:
            with torch.no_grad():
                for ch in chunks:
                    p, c = [prompts[j] for j in ch], [comps[j] for j in ch]
                    if cfg.num_iterations > 1:
                        lp, _, _ = completion_logprobs(model, p, c, cfg.temperature, self.tokenizer.pad_id)
                        old[ch, : lp.shape[1]] = lp
                    if ref is not None:
                        lp, _, _ = completion_logprobs(self.reference, p, c, cfg.temperature, self.tokenizer.pad_id)
                        ref[ch, : lp.shape[1]] = lp
        sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "clip_region": 0.0, "kl": 0.0, "ratio": 0.0}
        err_sum, err_n, ent_sum, grad_norm, tokens = 0.0, 0.0, 0.0, 0.0, 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        for it in range(cfg.num_iterations):
            self.opt.zero_grad(set_to_none=True)
            for ch in chunks:
                p, c = [prompts[j] for j in ch], [comps[j] for j in ch]
                logp, ent, mask = completion_logprobs(model, p, c, cfg.temperature, self.tokenizer.pad_id)
                t = logp.shape[1]
                mask = mask * loss_mask[ch, None]
                old_lp = logp.detach() if cfg.num_iterations == 1 else old[ch, :t]
                loss, st = policy_loss(logp, old_lp, A[ch], mask, None if ref is None else ref[ch, :t],
                                       cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.loss_type,
                                       cfg.max_completion_length, n_items, len(idx))
                loss.backward()
                if it == 0:
                    full = torch.tensor([[*batch.logprobs[idx[j]]] + [0.0] * (t - len(comps[j])) for j in ch],
                                        device=dev)  # the engine's log-probabilities, padded
                    n_c = torch.tensor([len(comps[j]) for j in ch], device=dev)
                    m = (torch.arange(t, device=dev)[None] < n_c[:, None]).float()
                    err_sum += float((torch.exp((logp.detach() - full).abs()) * m).sum())
                    err_n += float(m.sum())
                    ent_sum += float((ent * m).sum())
                    sums["loss"] += float(loss.detach())
                for name in ("clip_low", "clip_high", "clip_region", "kl", "ratio"):
                    sums[name] += getattr(st, name) * st.tokens
                tokens += st.tokens
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if math.isfinite(grad_norm):
                self.opt.step()
                self.engine.weights_updated()  # the fused AdamW step bumps no version counter
            self.opt.zero_grad(set_to_none=True)
        # loss, logprob error and entropy of the first pass (the rollout policy); clip, KL and ratio over all
        out = {"loss": sums["loss"], "grad_norm": grad_norm, "token_mult_prob_error": err_sum / max(err_n, 1.0),
               "entropy": ent_sum / max(err_n, 1.0)}
        for name in ("clip_low", "clip_high", "clip_region", "kl", "ratio"):
            out[name] = sums[name] / max(tokens, 1.0)
        return out
