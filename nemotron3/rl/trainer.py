"""RL on the training skeleton (train/stage.py): a step is rollouts, then the update.

    run = RLRun(cfg, console, source)        # cfg: rl/config.py's GRPOConfig; the policy sharded under torchrun
    run.run(resume)                          # the skeleton's loop over train_step(step):
        ro = run.rollouts(step)              #   Rollouts: the step's prompts, a RolloutBatch, rewards, metrics
        metrics = run.update(ro.batch, advantages, keep)    # num_iterations optimizer steps on the kept rows

The interface a rollout source implements (an override of `generate(step) -> Rollouts`, e.g. a multi-turn
environment): `rows` the step's P prompts; `batch` a RolloutBatch (rl/rollout.py) of P·G completions, the G of a
prompt next to each other, with the engine's log-probability of every completion token and optionally a per-token
`loss_mask` (1 = trained; 0 e.g. for a tool's output spliced into the completion); `rewards` (P·G,) float64
(NaN = no reward); `per_function` (P·G, F) each reward function's values; `metrics` extra numbers for the step's
record. The skeleton does the rest: group advantages, the update, metrics, checkpoints, resume.

`generate` renders the step's prompts with the chat template, samples G completions each through the engine
(after iGRPO's stage 1: N drafts, the best one written into the refinement prompt) and scores them. `update` runs
`num_iterations` optimizer steps (`Stage.optimizer_step`: clipping, the NaN/Inf guard, AdamW, then the engine told
the weights changed) on the kept completions: full-forward log-probabilities, the clipped ratio loss over
micro-batches, `token_mult_prob_error` against the engine's own log-probabilities. The arithmetic is in
rl/loss.py, the stage (evaluation, final/, summary.json) in rl/grpo.py (docs/post-training.md §6).

**Under torchrun** (docs/post-training.md §6, "Scale-out"): the policy is sharded with FSDP2 on every rank;
rank 0 alone holds a plain copy for the engine, refreshed with the gathered weights (the checkpoint's
all-gather) before the first rollout after an update; rank 0 generates and scores the whole batch and
broadcasts it, so every rank sees the rollouts one process would have sampled; each rank then trains on its
contiguous share of the kept completions, running the same number of forwards (a rank short of rows runs a
zero-weighted one: FSDP2's gathers are collectives), and the losses and statistics are summed over ranks.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from nemotron3 import checkpoint
from nemotron3.distributed import parallel
from nemotron3.engine import Engine, SamplingParams
from nemotron3.engine.params import has_mtp, speculative_config
from nemotron3.engine.sampling import derive_seed
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.options import ConfigError, device_of
from nemotron3.rl import igrpo, rewards
from nemotron3.rl.config import GRPOConfig
from nemotron3.rl.loss import completion_logprobs, group_advantages, policy_loss
from nemotron3.rl.prompts import FilePrompts, PromptRow, TaskPrompts
from nemotron3.rl.rollout import RolloutBatch, rollout
from nemotron3.train.optim import WSD
from nemotron3.train.stage import Stage

STATS = ("clip_low", "clip_high", "clip_region", "kl", "ratio")


@dataclass
class Rollouts:
    """A step's rollouts, what the update and the metrics read (see the module docstring)."""

    rows: list[PromptRow]
    batch: RolloutBatch
    rewards: torch.Tensor
    per_function: torch.Tensor
    metrics: dict


def _broadcast(obj: object) -> object:
    """Rank 0's `obj` on every rank (pickled)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def family_stats(rows: list[PromptRow], n: int, total: torch.Tensor) -> dict:
    """reward/<family> and reward_std/<family> of completions that come `n` per row."""
    fams = [r.columns.get("family") for r in rows for _ in range(n)]
    out = {}
    for f in sorted({f for f in fams if isinstance(f, str)}):
        vals = total[[i for i, x in enumerate(fams) if x == f]]
        out[f"reward/{f}"] = float(vals.nanmean())
        out[f"reward_std/{f}"] = float(vals[~vals.isnan()].std()) if (~vals.isnan()).sum() > 1 else 0.0
    return out


class RLRun(Stage):
    """One RL run on the skeleton: the policy, its tokenizer and engine, the prompts, rewards and optimizer, and
    a step's two halves, `rollouts(step)` and `update(...)`."""

    eval_at_end = False  # the stage evaluates after final/ instead

    def __init__(self, cfg: GRPOConfig, console: Console, source: Path) -> None:
        if not checkpoint.is_checkpoint(source):
            raise ConfigError(f"model (--model) {source} is not a checkpoint folder (no config.json)")
        device = device_of(cfg)
        model, tokenizer = checkpoint.open(  # trained: dense (packed is inference-only)
            source, device, torch.float32, strict_finite=cfg.strict_finite, dequantize=True, require_tokenizer=True)
        self.N, self.G = cfg.group_sizes()
        self.label = "igrpo" if self.N else "grpo"
        self.prompts = FilePrompts(cfg.data, cfg.seed) if cfg.data else TaskPrompts(cfg.families or None,
                                                                                    cfg.difficulty, cfg.seed)
        self.reward_fns = [rewards.load(s) for s in cfg.reward_funcs]
        self.weights = list(cfg.reward_weights) or [1.0] * len(self.reward_fns)
        self.tasks_reward = cfg.reward_funcs.index("tasks") if "tasks" in cfg.reward_funcs else None
        if cfg.speculative and not has_mtp(model):
            raise ConfigError(f"--speculative {cfg.speculative}: {source} has no MTP block")
        self.spec = speculative_config(model, cfg.speculative)  # None: the device's default
        self.k = self.spec.k
        self.sampling = SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                     top_k=cfg.top_k, top_p=cfg.top_p, num_speculative_tokens=self.k,
                                     max_thinking_tokens=cfg.max_thinking_tokens)
        self.context = model.config.max_position_embeddings
        rank, world = parallel.rank_world()
        # the engine's policy: the policy itself in one process; under torchrun a plain copy on rank 0
        self.rollout_model = model if world == 1 else copy.deepcopy(model) if rank == 0 else None
        self.stale = False  # the copy lags the sharded policy (an update since the last gather)
        super().__init__(model, tokenizer, cfg, cfg.out, console)  # shards `model` under torchrun
        self.engine = None if self.rollout_model is None else Engine(
            self.rollout_model, max_seq_len=self.context, think_tokens=ThinkTokens.from_tokenizer(tokenizer))
        self.reference = None
        if cfg.beta > 0:  # the frozen starting policy (every rank, unsharded); on resume, the run's --model
            self.reference = checkpoint.load(cfg.model, dtype=torch.float32, strict_finite=cfg.strict_finite,
                                             dequantize=True, device=parallel.device() if world > 1 else device)
            self.reference.eval().requires_grad_(False)
        self.build_optimizer(cfg.lr, cfg.weight_decay, cfg.betas, WSD(cfg.lr, cfg.steps, cfg.warmup, 0.0, 1.0,
                                                                        "linear"))

    # ------------------------------------------------------------------ rollouts
    def after_update(self) -> None:
        if self.world == 1:
            self.engine.weights_updated()  # the fused AdamW step bumps no version counter
        else:
            self.stale = True

    def sync(self) -> None:
        """Bring the engine's copy up to the sharded policy (a collective: every rank calls it)."""
        if self.stale:
            full = parallel.full_state_dict(self.model)
            if self.rollout_model is not None:
                self.rollout_model.load_state_dict(full)
                self.engine.weights_updated()
            self.stale = False

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
        self.rollout_model.eval()
        return rollout(self.engine, self.tokenizer, prompt_ids, n, replace(self.sampling, seed=seed))

    def score(self, rows: list[PromptRow], batch: RolloutBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of a rollout batch whose completions come `n` per row of `rows`."""
        prompts = [r.messages for r in rows for _ in range(n)]
        completions = [[{"role": "assistant", "content": t}] for t in batch.texts]
        names = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows for _ in range(n)] for k in names}
        columns["completion_ids"] = batch.completion_ids
        return rewards.score(self.reward_fns, self.weights, prompts, completions, columns)

    def rollouts(self, step: int) -> Rollouts:
        """The step's rollouts on every rank: generated and scored on rank 0 under torchrun, then broadcast (an
        error there, a failing reward function say, is raised on every rank)."""
        self.sync()
        if self.world == 1:
            return self.generate(step)
        out: object = None
        if self.rank == 0:
            try:
                out = self.generate(step)
            except Exception as e:  # every rank stops with it, none waits for a broadcast that never comes
                out = e
        out = _broadcast(out)
        if isinstance(out, Exception):
            raise out
        return out

    def generate(self, step: int) -> Rollouts:
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
        return Rollouts(rows, batch, total, per, extra)

    # ------------------------------------------------------------------ the update
    def _shares(self, n: int) -> list[list[int]]:
        """This rank's micro-batches of the n kept completions (positions 0..n-1): a contiguous share of
        ceil(n / world), in chunks of --micro-batch-size; every rank gets the same number of chunks, a chunk that
        falls past the rows is empty (the caller runs a zero-weighted forward for it)."""
        share = -(-n // self.world)
        mb = self.cfg.micro_batch_size or share
        lo, hi = self.rank * share, min(n, (self.rank + 1) * share)
        return [list(range(s, min(s + mb, hi))) for s in range(lo, lo + share, mb)]

    def update(self, batch: RolloutBatch, adv: torch.Tensor, keep: torch.Tensor) -> dict:
        """`num_iterations` optimizer steps on the kept completions at the rate `set_lr` put in place; returns the
        step's loss metrics, summed over ranks."""
        cfg, model = self.cfg, self.model
        dev = parallel.device() if self.world > 1 else next(model.parameters()).device
        idx = keep.nonzero().view(-1).tolist()
        prompts = [batch.prompt_ids[i] for i in idx]
        comps = [batch.completion_ids[i] for i in idx]
        kept = [0.0 if (cfg.mask_truncated_completions and batch.truncated[i]) else 1.0 for i in idx]
        weights = [[k * w for w in batch.loss_mask[i]] if batch.loss_mask is not None else [k] * len(c)
                   for i, k, c in zip(idx, kept, comps)]  # per token: trained (1) or not (0)
        A = adv[idx].to(dev)
        chunks = self._shares(len(idx))
        n_items = float(sum(sum(w) for w in weights))
        T = max(len(c) for c in comps)
        old = torch.zeros(len(idx), T, device=dev)
        ref = torch.zeros(len(idx), T, device=dev) if self.reference is not None else None
        model.train()

        def logprobs(m: torch.nn.Module, ch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = ch or [0]  # an empty chunk forwards one row, weighted 0: the sharded forward is a collective
            return completion_logprobs(m, [prompts[j] for j in rows], [comps[j] for j in rows], cfg.temperature,
                                       self.tokenizer.pad_id)

        if cfg.num_iterations > 1 or ref is not None:
            with torch.no_grad():
                for ch in chunks:
                    if cfg.num_iterations > 1:
                        lp, _, _ = logprobs(model, ch)
                        old[ch, : lp.shape[1]] = lp[: len(ch)]
                    if ref is not None and ch:
                        lp, _, _ = logprobs(self.reference, ch)
                        ref[ch, : lp.shape[1]] = lp
        # loss, logprob error (sum, count), entropy, then Σ tokens·stat for each of STATS, and the tokens
        sums = torch.zeros(5 + len(STATS), dtype=torch.float64, device=dev)
        grad_norm = 0.0
        for it in range(cfg.num_iterations):
            for ch in chunks:
                logp, ent, mask = logprobs(model, ch)
                if not ch:
                    (logp.sum() * 0.0).backward()
                    continue
                t = logp.shape[1]
                w = torch.tensor([weights[j] + [0.0] * (t - len(weights[j])) for j in ch], device=dev)
                old_lp = logp.detach() if cfg.num_iterations == 1 else old[ch, :t]
                loss, st = policy_loss(logp, old_lp, A[ch], mask * w, None if ref is None else ref[ch, :t],
                                       cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.loss_type,
                                       cfg.max_completion_length, n_items, len(idx))
                loss.backward()
                if it == 0:
                    full = torch.tensor([[*batch.logprobs[idx[j]]] + [0.0] * (t - len(comps[j])) for j in ch],
                                        device=dev)  # the engine's log-probabilities, padded
                    own = mask if batch.loss_mask is None else mask * torch.tensor(  # the model's tokens only
                        [[*batch.loss_mask[idx[j]]] + [0.0] * (t - len(comps[j])) for j in ch], device=dev)
                    sums[0] += float(loss.detach())
                    sums[1] += float((torch.exp((logp.detach() - full).abs()) * own).sum())
                    sums[2] += float(own.sum())
                    sums[3] += float((ent * own).sum())
                for s, name in enumerate(STATS):
                    sums[4 + s] += getattr(st, name) * st.tokens
                sums[-1] += st.tokens
            grad_norm, _ = self.optimizer_step()
        parallel.all_reduce_sum_(sums)
        # loss, logprob error and entropy of the first pass (the rollout policy); clip, KL and ratio over all
        out = {"loss": float(sums[0]), "grad_norm": grad_norm,
               "token_mult_prob_error": float(sums[1] / max(float(sums[2]), 1.0)),
               "entropy": float(sums[3] / max(float(sums[2]), 1.0))}
        for s, name in enumerate(STATS):
            out[name] = float(sums[4 + s] / max(float(sums[-1]), 1.0))
        return out

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict:
        """Rollouts, group advantages, the update; the step's metrics record (docs/post-training.md §6)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.set_lr(step)
        ro = self.rollouts(step)
        batch, total, per = ro.batch, ro.rewards, ro.per_function
        t_roll = time.perf_counter() - t0
        adv = group_advantages(total, self.G, cfg.scale_rewards, cfg.leave_one_out)
        keep = torch.ones_like(total, dtype=torch.bool)
        if cfg.skip_zero_variance_groups:
            keep = ~adv.zero_std.repeat_interleave(self.G)
        if cfg.mask_truncated_completions and all(batch.truncated[i] for i in keep.nonzero().view(-1).tolist()):
            keep[:] = False  # every kept completion was cut: nothing to learn from
        lengths = [len(c) for c in batch.completion_ids]
        record = {"step": step + 1, "reward": float(total.nanmean()),
                  "reward_std": float(total[~total.isnan()].std()) if (~total.isnan()).sum() > 1 else 0.0,
                  **family_stats(ro.rows, self.G, total)}
        if self.tasks_reward is not None:
            record["accuracy"] = float(per[:, self.tasks_reward].nanmean())
        for j, spec in enumerate(cfg.reward_funcs):
            if len(cfg.reward_funcs) > 1:
                record[f"rewards/{spec}"] = float(per[:, j].nanmean())
        if bool(keep.any()):
            record.update(self.update(batch, adv.advantages, keep))
        else:
            record["skipped"] = True
        record.update({
            "lr": lr, "completion_length": sum(lengths) / len(lengths), "truncated": float(sum(batch.truncated)) /
            len(batch.truncated), "zero_std_groups": int(adv.zero_std.sum()),
            "groups": len(adv.zero_std), "rollout_tok_s": round(batch.stats["tok_s"], 1),
            "rollout_seconds": round(t_roll, 2), "step_seconds": round(time.perf_counter() - t0, 2), **ro.metrics})
        if "acceptance_length" in batch.stats:
            record["acceptance_length"] = round(batch.stats["acceptance_length"], 3)
        return record

    def progress(self, record: dict) -> str:
        return f"reward {record['reward']:.3f} {record['rollout_tok_s']:.0f} tok/s"

    def line(self, record: dict) -> str:
        return (f"step {record['step']:4d}  reward {record['reward']:.3f}  "
                f"acc {record.get('accuracy', float('nan')):.3f}  len {record['completion_length']:.0f}  "
                f"mult_prob_err {record.get('token_mult_prob_error', float('nan')):.4f}  "
                f"clip {record.get('clip_region', 0):.3f}  zero-std {record['zero_std_groups']}/"
                f"{record['groups']}  rollout {record['rollout_tok_s']:.0f} tok/s")
