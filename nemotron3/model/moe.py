"""MoE and LatentMoE of an `E` layer (docs/architecture.md §4-5).

    scores  = sigmoid(x W_rᵀ)                           fp32, on the full hidden state
    experts = top-k(scores + e_score_correction_bias)   the bias steers *selection* only
    w       = scores[experts] / Σ scores[experts] · routed_scaling_factor
    z       = fc1_latent_proj(x)                        LatentMoE only: H -> ℓ
    y       = Σ_k w_k · down_k(relu(up_k(z))²)          non-gated relu² experts
    out     = fc2_latent_proj(y) + SharedExpert(x)      the shared expert always sees the full x

Routed experts are stored as two 3-D tensors, `up_proj` (E, I, ℓ) and `down_proj` (E, ℓ, I), and run
grouped: the (token, slot) pairs are sorted by expert once, and each expert multiplies its contiguous
slice of tokens in one matmul; no loop ever runs over tokens. `Experts.forward_reference` is the
token-by-token definition, kept beside the fast path for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.norms import MLP, relu2


class TopKRouter(nn.Module):
    """Sigmoid router with the aux-loss-free correction bias (a persistent fp32 buffer, not a parameter)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = float(config.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> scores (N, E) fp32, expert ids (N, k), combine weights (N, k) fp32."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:  # group-limited routing (DeepSeek-V3); a no-op for n_group = 1
            N = choice.shape[0]
            grouped = choice.view(N, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, w * self.scaling


class Experts(nn.Module):
    """E non-gated relu² experts, `up_proj` (E, I, ℓ) and `down_proj` (E, ℓ, I), as in transformers."""

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One expert GEMM, x (n, in) · wᵀ. NVFP4 training routes it through a quantized GEMM instead
        (quant/convert.py sets `gemm_quantizer`); the grouped forward calls only this."""
        q = self.__dict__.get("gemm_quantizer")
        return F.linear(x, w) if q is None else q.gemm(x, w)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, ℓ), idx (N, k), w (N, k) -> y (N, ℓ) and tokens per expert (E,).

        Sort the N·k (token, slot) pairs by expert, gather the token rows once, run one matmul pair per
        expert on its contiguous slice, weight, and scatter-add back. Accumulation is fp32, as the router
        weights are.
        """
        N, k = idx.shape
        flat = idx.reshape(-1)  # (N·k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,)
        token = order // k  # which token each sorted pair came from
        xs = x.index_select(0, token)  # (N·k, ℓ)
        # split/unbind rather than slicing in a loop: their backward is one cat/stack instead of one
        # full-size zero tensor per expert
        sizes = counts.tolist()
        parts = xs.split(sizes)
        ups, downs = self.up_proj.unbind(0), self.down_proj.unbind(0)
        # (n_e, ℓ)
        outs = [self.linear(relu2(self.linear(p, ups[e])), downs[e]) for e, p in enumerate(parts) if sizes[e]]
        ys = torch.cat(outs).float() * w.reshape(-1)[order, None]
        y = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, ys)
        return y.to(x.dtype), counts

    def forward_reference(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Token by token and slot by slot: the definition the grouped path must reproduce."""
        y = torch.zeros(x.shape, dtype=torch.float32)
        for i in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[i, j])
                h = relu2(self.up_proj[e].float() @ x[i].float())
                y[i] += w[i, j].float() * (self.down_proj[e].float() @ h)
        return y.to(x.dtype)


class MoE(nn.Module):
    """Routed experts (+ LatentMoE projections when `moe_latent_size` is set) plus one shared expert.

    After each forward, `tokens_per_expert` (E,) holds the routed load of the last batch: the input of the
    aux-loss-free bias update. Set `record_scores = True` to also keep the router scores (for the sequence
    aux loss) in `last_scores` (N, E).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, latent = config.hidden_size, config.moe_latent_size
        self.gate = TopKRouter(config)
        self.experts = Experts(config.n_routed_experts, config.moe_expert_dim, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(H, config.moe_shared_expert_intermediate_size, bias=config.mlp_bias)
            if config.n_shared_experts else None
        )
        self.fc1_latent_proj = nn.Linear(H, latent, bias=config.mlp_bias) if latent is not None else None
        self.fc2_latent_proj = nn.Linear(latent, H, bias=config.mlp_bias) if latent is not None else None
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long),
                             persistent=False)
        self.record_scores = False
        self.last_scores: torch.Tensor | None = None
        self.last_topk: torch.Tensor | None = None

    @torch.no_grad()
    def init_weights(self, config: ModelConfig, n_layers: int) -> None:
        std = config.initializer_range
        nn.init.normal_(self.gate.weight, std=std)
        self.gate.e_score_correction_bias.zero_()
        nn.init.normal_(self.experts.up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=std)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    mod.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (b, t, H) -> (b, t, H)."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])  # (N, H)
        scores, idx, w = self.gate(x)
        z = self.fc1_latent_proj(x) if self.fc1_latent_proj is not None else x  # (N, ℓ)
        y, counts = self.experts(z, idx, w)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        self.tokens_per_expert = counts
        if self.record_scores:
            self.last_scores, self.last_topk = scores, idx
        return y.view(shape)
