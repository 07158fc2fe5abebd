"""Expert load balancing: the aux-loss-free bias update and the sequence-level aux loss (docs/architecture.md §4).

**Bias update (DeepSeek-V3, Megatron `get_updated_expert_bias`).** Each router selects experts by
`sigmoid score + e_score_correction_bias`; the bias steers selection only, never the combine weights. After
every optimizer step, with `load_i` the tokens routed to expert i over the whole global batch (all micro-
batches, all ranks, every forward of the layer: an MTP layer run at two depths counts twice),

    b_i += rate · sign(mean(load) − load_i)        rate = 1e-3

outside autograd. Overloaded experts get a lower bias and lose marginal tokens; idle ones gain. The sign
makes the step size independent of the batch size, so the bias drifts at most `rate` per step.

**Sequence aux loss (Megatron `seq_aux_loss`, DeepSeek-V3's complementary loss).** Per sequence s of
length T, with p the router's sigmoid scores normalised to sum to 1 over experts (Megatron's
`scores / (Σ scores + 1e-20)` for sigmoid routers) and c_i the number of positions whose unbiased top-k
(top-k of the raw scores, as Megatron computes it for the loss) contains expert i:

    L_s = E / (k·T²) · Σ_i c_i · Σ_t p_{t,i}  =  E · Σ_i f_i · P_i,   f_i = c_i / (k·T),  P_i = mean_t p_{t,i}

L_s is 1 when routing and probability are both uniform and grows with their correlated imbalance; only
P carries gradient. The loss added to the objective is `coeff · Σ_layers Σ_s L_s / B` (coeff 1e-4, B the
global number of sequences), which is invariant to how the batch is split into micro-batches and ranks.

Both hook into the model from outside: a forward hook on every `MoE` module reads `tokens_per_expert` and
(with `record_scores`) `last_scores`, so the model code knows nothing about training.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.model.moe import MoE


def seq_aux_loss(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores (B, T, E) sigmoid router scores -> (B,) per-sequence balance loss L_s (see module docstring)."""
    B, T, E = scores.shape
    p = scores / (scores.sum(-1, keepdim=True) + 1e-20)  # (B, T, E)
    idx = scores.detach().topk(top_k, dim=-1).indices  # (B, T, k)
    counts = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, idx.reshape(B, -1), torch.ones(B, T * top_k, dtype=scores.dtype, device=scores.device))
    return (counts * p.sum(1)).sum(-1) * (E / (top_k * T * T))  # (B,)


def seq_aux_loss_reference(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Loops over sequences, positions and experts: the formula as written, for tests."""
    B, T, E = scores.shape
    out = []
    for b in range(B):
        f = [0.0] * E
        P = [0.0] * E
        for t in range(T):
            s = scores[b, t].tolist()
            total = sum(s) + 1e-20
            chosen = sorted(range(E), key=lambda i: -s[i])[:top_k]
            for i in range(E):
                P[i] += s[i] / total / T
                f[i] += (i in chosen) / (top_k * T)
        out.append(E * sum(fi * pi for fi, pi in zip(f, P)))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """b_i += rate · sign(mean(load) − load_i), in place (fp32 buffer)."""
    load = load.to(torch.float64)
    bias += (rate * torch.sign(load.mean() - load)).to(bias.dtype)


class ExpertBalance:
    """Watches every MoE layer of a model through forward hooks while `active` (training forwards only).

    Per step: `loads[name]` (E,) accumulates `tokens_per_expert`; `aux_terms` collects Σ_s L_s per layer
    forward when `seq_aux_coeff > 0`. `step_aux_loss(global_batch)` turns them into the loss term, and
    `apply_bias_update()` moves the correction biases, then `reset()` starts the next step.
    """

    def __init__(self, model: nn.Module, rate: float = 1e-3, seq_aux_coeff: float = 1e-4) -> None:
        self.rate, self.seq_aux_coeff = rate, seq_aux_coeff
        self.moes: dict[str, MoE] = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
        self.loads = {name: torch.zeros(m.gate.num_experts, dtype=torch.long, device=m.tokens_per_expert.device)
                      for name, m in self.moes.items()}  # on the model's device: all_reduce over NCCL needs it
        self.aux_terms: list[torch.Tensor] = []
        self.active = False
        self._handles = []
        for name, m in self.moes.items():
            m.record_scores = seq_aux_coeff > 0
            self._handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: MoE, inputs: tuple, output: torch.Tensor) -> None:
            if self.active:
                self.loads[name] += module.tokens_per_expert.to(self.loads[name].device)
                if module.record_scores and module.last_scores is not None:
                    b, t = inputs[0].shape[:2]
                    scores = module.last_scores.view(b, t, -1)  # (b, t, E)
                    self.aux_terms.append(seq_aux_loss(scores, module.gate.top_k).sum())
            module.last_scores = module.last_topk = None  # never keep a graph alive past its forward

        return hook

    def reset(self) -> None:
        for v in self.loads.values():
            v.zero_()
        self.aux_terms = []

    def take_aux_loss(self, global_batch: int) -> torch.Tensor | None:
        """coeff · Σ (collected terms) / B for the forwards since the last call, or None if there are none."""
        if not self.aux_terms:
            return None
        terms, self.aux_terms = self.aux_terms, []
        return self.seq_aux_coeff * torch.stack(terms).sum() / global_batch

    def all_reduce(self) -> None:
        """Sum the loads over data-parallel ranks (the bias update needs the global batch's load)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for v in self.loads.values():
                torch.distributed.all_reduce(v)

    def apply_bias_update(self) -> None:
        for name, m in self.moes.items():
            update_bias(m.gate.e_score_correction_bias, self.loads[name], self.rate)

    def load_ratio(self) -> dict[str, float]:
        """max/min tokens per expert of each layer this step (min clipped at 1 so it stays finite)."""
        return {name: float(v.max()) / max(1.0, float(v.min())) for name, v in self.loads.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for m in self.moes.values():
            m.record_scores = False
