"""The GRPO arithmetic: group-relative advantages, per-token log-probabilities, the clipped ratio loss.

Advantages (one scalar per completion, broadcast to its tokens). Rewards come in groups of G completions of
one prompt, laid out group after group.

    baseline   "mean" (TRL):            b_i = mean_j r_j over the group
               leave-one-out (NeMo-RL):  b_i = mean_{j != i} r_j
    scale      "group": std over the group (Bessel-corrected; with leave-one-out, of the other G-1 rewards,
               NeMo-RL's), "batch": std over every reward of the batch, "none": no scaling
    A_i = (r_i - b_i) / (std_i + eps)      (eps = 1e-4, TRL's); A_i = r_i - b_i when unscaled or std_i = 0
    a NaN reward (every reward function said None) has A = 0 and is left out of its group's statistics.

A group whose rewards are all equal (zero variance) carries no signal: every A is 0. They are counted
(`zero_std`), and DAPO's dynamic sampling can skip them (the trainer's `skip_zero_variance_groups`).

Loss, per completion token t of completion i, with r = exp(logp - old_logp) (TRL's `_compute_loss`):

    ℓ_it = -min(r·A_i, clamp(r, 1 - ε, 1 + ε_high)·A_i) + β·k3,     k3 = exp(ref - logp) - (ref - logp) - 1

k3 is the KL estimator of Schulman's note (non-negative, unbiased for KL(π‖π_ref)). With one pass over the
batch (`num_iterations = 1`), old_logp = logp.detach(): r = 1 in value, the gradient is the policy gradient.
Aggregation, `loss_type` as TRL defines it:

    "grpo"      the mean over each completion's tokens, then the mean over completions
    "dapo"      Σ_it ℓ / (active tokens of the whole batch)
    "dr_grpo"   Σ_it ℓ / (completions · max_completion_length)   (Dr. GRPO: no length bias)

Micro-batches: `policy_loss` takes the whole batch's counts (`num_items`, `num_sequences`), so the sum of the
micro-batch losses is the whole batch's loss, whatever the split. Clip statistics are TRL's: a token is
clipped low when r < 1 - ε and A < 0, high when r > 1 + ε_high and A > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (TRL's `nanstd`); NaN with fewer than two values."""
    valid = ~x.isnan()
    n = valid.sum(dim) if dim is not None else valid.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    sq = ((x - mean) ** 2).nan_to_num(0.0)
    total = sq.sum(dim) if dim is not None else sq.sum()
    return (total / (n - 1)).sqrt()


@dataclass
class Advantages:
    advantages: torch.Tensor  # (N,) float64
    baseline: torch.Tensor  # (N,)
    std: torch.Tensor  # (N,) the scale used (NaN when undefined)
    zero_std: torch.Tensor  # (N // G,) bool: groups whose rewards are all equal


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     leave_one_out: bool = False, eps: float = 1e-4) -> Advantages:
    """rewards (N,) in groups of `num_generations` -> advantages (N,); see the module docstring."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    G = num_generations
    r = rewards.double()
    if r.numel() % G:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {G}")
    g = r.view(-1, G)  # (P, G)
    valid = ~g.isnan()
    zero_std = torch.tensor([bool((row[ok] == row[ok][0]).all()) if ok.any() else True
                             for row, ok in zip(g, valid)], device=r.device)
    if leave_one_out:
        filled = g.nan_to_num(0.0)
        n_other = valid.sum(-1, keepdim=True) - valid.long()  # (P, G) valid rewards besides this one
        s1 = filled.sum(-1, keepdim=True) - filled
        s2 = (filled**2).sum(-1, keepdim=True) - filled**2
        base = s1 / n_other
        var = (s2 / n_other - base**2) * n_other / (n_other - 1)
        std = var.clamp(min=0).sqrt()
        base = torch.where(n_other > 0, base, g)  # a group of one valid sample: A = 0
    else:
        base = torch.nanmean(g, dim=-1, keepdim=True).expand_as(g)
        std = _nanstd(g, dim=-1)[:, None].expand_as(g)
    if scale_rewards == "batch":
        std = _nanstd(r).expand_as(g)
    adv = g - base
    if scale_rewards != "none":
        scaled = adv / (std + eps)
        adv = torch.where(std > 0, scaled, adv)  # a constant group (or other G-1) is left unscaled
    adv = adv.nan_to_num(0.0)
    return Advantages(adv.reshape(-1), base.reshape(-1), std.reshape(-1), zero_std)


def completion_logprobs(model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log π(token) of each completion token given its prompt and the tokens before it, under the sampling
    temperature (logits / T; T = 0 reads as 1), from one full forward of the right-padded rows.

    -> (logp (N, Tc), entropy (N, Tc) of the same distribution, mask (N, Tc) float; Tc the longest completion).
    Right padding is exact for a causal model: padding after a row's tokens changes none of their outputs.
    """
    N = len(prompts)
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    Tc = max(max(len(c) for c in completions), 1)
    L = max(lens)
    dev = next(model.parameters()).device
    # each row padded on the host, then one copy per tensor to the model's device
    ids = torch.tensor([[*p, *c] + [pad_id] * (L - n) for p, c, n in zip(prompts, completions, lens)],
                       dtype=torch.long, device=dev)
    targets = torch.tensor([[*c] + [pad_id] * (Tc - len(c)) for c in completions], dtype=torch.long, device=dev)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (Tc - len(c)) for c in completions], device=dev)
    plen = torch.tensor([len(p) for p in prompts], device=dev)
    pos = (plen[:, None] - 1 + torch.arange(Tc, device=dev)[None]).clamp(max=L - 1)  # (N, Tc): the predicting position
    logits = model(ids)  # (N, L, V)
    V = logits.shape[-1]
    picked = logits.gather(1, pos[..., None].expand(N, Tc, V)).float() / (temperature or 1.0)
    logp_all = torch.log_softmax(picked, dim=-1)  # (N, Tc, V)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach(), mask


@dataclass
class LossStats:
    clip_low: float  # fractions of active tokens (TRL's clip_ratio/low_mean, high_mean, region_mean)
    clip_high: float
    clip_region: float
    kl: float  # mean k3 over active tokens (0 when β = 0 and no reference is given)
    ratio: float  # mean r over active tokens
    tokens: float  # active tokens of this (micro-)batch


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logp: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                beta: float = 0.0, loss_type: str = "dapo", max_completion_length: int | None = None,
                num_items: float | None = None, num_sequences: int | None = None) -> tuple[torch.Tensor, LossStats]:
    """logp, old_logp, ref_logp, mask (N, T); advantages (N,) -> (the loss, its statistics); see the module
    docstring. `num_items` / `num_sequences`: the whole batch's active tokens and completions (default: this
    batch's), so that micro-batch losses add up to the batch's."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    A = advantages.to(logp.dtype)[:, None]  # (N, 1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * A, clipped * A)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference policy's log-probabilities")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    n_items = float(mask.sum()) if num_items is None else float(num_items)
    n_seq = logp.shape[0] if num_sequences is None else int(num_sequences)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / max(n_items, 1.0)
    else:  # dr_grpo
        if not max_completion_length:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (n_seq * max_completion_length)
    with torch.no_grad():
        active = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - eps_low) & (A < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + eps_high) & (A > 0)).to(mask.dtype) * mask
        stats = LossStats(float(low.sum() / active), float(high.sum() / active), float((low + high).sum() / active),
                          float((kl * mask).sum() / active), float((ratio * mask).sum() / active), float(mask.sum()))
    return loss, stats
