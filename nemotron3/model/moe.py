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

`MoEStep` is the same layer for the fast decoder (engine/decode.py), where a step has only B·t tokens and
the cost is the number of tensor ops, not FLOPs:

* router | fc1_latent_proj | shared up_proj fused into one matrix (all three read the same normed input)
  and fc2_latent_proj | shared down_proj side by side (their outputs are summed, so one matmul over the
  concatenated inputs does both); the residual add folded into that `addmm`;
* for a handful of tokens (N·k < E) one GEMV pair per (token, chosen expert), reading only those experts
  and normalising the router weights on the host; for more tokens the pairs are grouped by expert and
  each expert runs one GEMM pair on its tokens; from N·k >= 2E (`padded_min_pairs`) all experts run as
  one padded batched matmul pair, two calls instead of ~2E (the measurements: docs/results.md);
* `traceable=True` (for `torch.compile`, which cannot sync with the host): the chosen experts are read by
  indexing inside one fused multiply-and-sum while that reads each expert at most ~4 times (N·k <= 4E),
  and beyond every expert runs densely with weight 0 for the ones not chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.norms import MLP, relu2
from nemotron3.model.packing import Packer, addmm, mm, pack_weight
from nemotron3.model.recompute import recomputing
from nemotron3.model.state import StateSpec


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
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
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

    @staticmethod
    def state_spec(config: ModelConfig, max_len: int) -> dict[str, StateSpec]:
        """Nothing: each token is routed and processed alone."""
        return {}

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
        if self.record_scores and not recomputing():  # a checkpoint's recompute is no new forward to score
            self.last_scores, self.last_topk = scores, idx
        return y.view(shape)


class MoEStep:
    """The fused MoE / LatentMoE layer of the fast decoder: `step(h, x, cache)` -> h + moe(x), x (N, H).

    `padded_min_pairs`: N·k from which the padded batched experts run (eager); `traceable`: the variant
    for `torch.compile` (see the module docstring).
    """

    def __init__(self, mixer: MoE, config: ModelConfig, traceable: bool = False, pack: Packer | None = None) -> None:
        m, c = mixer, config
        self.traceable = traceable
        self.E, self.k = c.n_routed_experts, c.num_experts_per_tok
        self.scaling, self.norm_topk = float(c.routed_scaling_factor), c.norm_topk_prob
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.padded_min_pairs = 2 * c.n_routed_experts
        self.latent, self.shared = m.fc1_latent_proj is not None, m.shared_experts is not None
        self.dtype = dtype = m.experts.up_proj.dtype  # the activations' dtype
        self.exact = dtype == torch.float32 and pack is None
        if pack is not None and traceable:
            raise ValueError("MoEStep: packed (int8) expert weights have no traceable (torch.compile) variant")
        ins = [m.gate.weight] if self.exact else []  # bf16 / packed: the router runs apart, in fp32
        ins += [m.fc1_latent_proj.weight] if self.latent else []
        ins += [m.shared_experts.up_proj.weight] if self.shared else []
        outs = [m.fc2_latent_proj.weight] if self.latent else []
        outs += [m.shared_experts.down_proj.weight] if self.shared else []
        self.w_router_t = None if self.exact else m.gate.weight.float().t().contiguous()  # (H, E) fp32
        self.off = self.E if self.exact else 0  # where the latent | shared-up columns start in the fused output
        # router | fc1_latent | shared up (fp32), fc1_latent | shared up (bf16 / packed)
        self.w_in_t = pack_weight(torch.cat(ins), pack) if ins else None
        self.w_out_t = pack_weight(torch.cat(outs, dim=1), pack) if outs else None  # (ℓ + I_s) -> H
        up, down = m.experts.up_proj, m.experts.down_proj  # (E, I, ℓ), (E, ℓ, I): the model's own
        self.up, self.down = (up, down) if traceable else (None, None)  # read by the traceable variant only
        E, inter, ell = up.shape
        self.inter, self.ell = inter, ell
        if self.exact:  # fp32: contiguous (in, out) copies, MKL's layout
            self.up_blocks = up.transpose(1, 2).contiguous()  # (E, ℓ, I): one contiguous block per expert
            self.down_t = down.transpose(1, 2).reshape(E * inter, ell).contiguous()  # (E·I, ℓ)
            self.down_blocks = self.down_t.view(E, inter, ell)
        elif pack is None:  # bf16: views of the model's own tensors (packing.py)
            self.up_blocks, self.down_blocks = up.transpose(1, 2), down.transpose(1, 2)
            self.down_t = self.down_blocks.reshape(E * inter, ell) if traceable else None
        else:  # packed: per-expert packed weights only (below)
            self.up_blocks = self.down_blocks = self.down_t = None
        self.up_t = self.up_blocks.permute(1, 0, 2).reshape(ell, E * inter) if traceable else None  # dense form
        if pack is None:
            self.up_e, self.down_e = list(self.up_blocks.unbind(0)), list(self.down_blocks.unbind(0))
        else:  # no batched form: the padded path runs grouped
            self.up_e, self.down_e = [pack(w) for w in up.unbind(0)], [pack(w) for w in down.unbind(0)]
            self.padded_min_pairs = float("inf")
        self.correction_bias = m.gate.e_score_correction_bias  # (E,) steers the selection only

    def __call__(self, h: torch.Tensor, x: torch.Tensor, cache=None) -> torch.Tensor:
        N, E, k, inter, ell, o = h.shape[0], self.E, self.k, self.inter, self.ell, self.off
        # router logits | latent input | shared up_proj (fp32); latent | shared up (bf16 / packed)
        fused = mm(x, self.w_in_t) if self.w_in_t is not None else None
        scores = torch.sigmoid(fused[:, :E] if self.exact else torch.mm(x.float(), self.w_router_t))  # (N, E) fp32
        if self.n_group > 1:  # rare: the reference router's group-limited selection rule
            idx = self._grouped_topk(scores + self.correction_bias)
        else:
            idx = torch.topk(scores + self.correction_bias, k, dim=-1, sorted=False).indices  # (N, k)
        w = scores.gather(1, idx)  # (N, k) router weights of the chosen experts, not yet normalised
        z = fused[:, o : o + ell] if self.latent else x  # (N, ℓ)
        if N * k < E and not self.traceable:  # few (token, expert) pairs: one GEMV pair each, chosen experts only
            y = torch.zeros(N, ell, device=z.device)  # fp32: the combination accumulates in fp32
            for b, (experts, ws) in enumerate(zip(idx.tolist(), w.tolist())):  # weights normalised on the host
                scale = self.scaling / (sum(ws) + 1e-20) if self.norm_topk else self.scaling
                zb, yb = z[b : b + 1], y[b : b + 1]
                for e, we in zip(experts, ws):
                    if self.exact:
                        yb.addmm_(torch.mm(zb, self.up_e[e]).relu_().square_(), self.down_e[e], alpha=we * scale)
                    else:
                        yb.add_(mm(mm(zb, self.up_e[e]).relu_().square_(), self.down_e[e]), alpha=we * scale)
            return self._out(h, fused, y)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * self.scaling
        if self.traceable and N * k <= 4 * E:  # compiled, <= ~4 reads per expert: fused indexed multiply-and-sum
            flat = idx.reshape(-1)  # (N·k,)
            hid = (self.up[flat] * z.repeat_interleave(k, dim=0)[:, None, :]).sum(-1).relu().square()  # (N·k, I)
            out = (self.down[flat] * hid[:, None, :]).sum(-1).view(N, k, ell)
            y = (out * w[:, :, None]).sum(1)  # (N, ℓ)
        elif self.traceable:  # compiled, many more tokens: every expert for every token, weight 0 where not chosen
            dense_w = torch.zeros(N, E, device=w.device).scatter_(1, idx, w).to(self.dtype)  # (N, E)
            hid = torch.mm(z, self.up_t).relu_().square_().view(N, E, inter)  # (N, E, I)
            y = torch.mm((hid * dense_w[:, :, None]).view(N, E * inter), self.down_t)  # (N, ℓ)
        elif N * k < self.padded_min_pairs:  # several tokens: one GEMM pair per chosen expert on its tokens
            y = self._experts_grouped(z, idx, w)
        else:  # many tokens: every expert runs its tokens as one slice of a padded batched matmul pair
            y = self._experts_padded(z, idx, w)
        return self._out(h, fused, y)

    def _experts_grouped(self, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """z (N, ℓ), idx (N, k), w (N, k) -> (N, ℓ): the (token, expert) pairs sorted by expert, one GEMM pair
        per expert that has tokens (only the chosen experts' weights are read)."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort()
        rows = order // k
        counts = torch.bincount(flat, minlength=self.E).tolist()
        outs = []
        for e, zs in enumerate(z.index_select(0, rows).split(counts)):
            if counts[e]:
                outs.append(mm(mm(zs, self.up_e[e]).relu_().square_(), self.down_e[e]))
        ys = torch.cat(outs).float().mul_(w.reshape(-1)[order, None])  # (N·k, ℓ) fp32
        return torch.zeros(N, z.shape[1], device=z.device).index_add_(0, rows, ys)

    def _experts_padded(self, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """z (N, ℓ), idx (N, k), w (N, k) -> routed output (N, ℓ), for N·k >= padded_min_pairs.

        Pair i = (token b, slot j) gets slot `pos` = how many earlier pairs chose the same expert, so expert
        e's tokens sit in X[e, :count_e]; X is (E, m, ℓ) with m = the largest count, and two `bmm`s run every
        expert at once. Unused slots are zero rows (relu² of 0 is 0, so they stay zero and are never read).
        Two calls replace the ~2E small, dispatch-bound calls of one GEMM pair per expert, for at most
        m·E / (N·k) times the useful FLOPs.
        """
        N, k = idx.shape
        E, ell = self.E, z.shape[-1]
        flat = idx.reshape(-1)  # (N·k,)
        onehot = F.one_hot(flat, E)  # (N·k, E)
        pos = (onehot.cumsum(0) - 1).gather(1, flat[:, None])[:, 0]  # (N·k,) rank within the expert
        m = int(onehot.sum(0).max())
        X = z.new_zeros(E, m, ell)
        X[flat, pos] = z.repeat_interleave(k, dim=0)
        Y = torch.bmm(torch.bmm(X, self.up_blocks).relu_().square_(), self.down_blocks)  # (E, m, ℓ)
        return (Y[flat, pos].view(N, k, ell) * w[:, :, None]).sum(1)

    def _out(self, h: torch.Tensor, fused: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Residual + fc2_latent_proj(y) + shared expert, as one addmm over [y | relu²(shared up)]."""
        o, ell = self.off, self.ell
        y = y.to(self.dtype)  # the routed output, accumulated in fp32
        if self.w_out_t is None:
            return h + y
        if not self.latent:  # plain MoE: the routed output is already in H; w_out is the shared down_proj
            return addmm(h + y, fused[:, o:].relu().square_(), self.w_out_t)
        if self.shared:
            y = torch.cat([y, fused[:, o + ell :].relu().square_()], dim=1)  # (N, ℓ + I_s)
        return addmm(h, y, self.w_out_t)

    def _grouped_topk(self, choice: torch.Tensor) -> torch.Tensor:
        N = choice.shape[0]
        grouped = choice.view(N, self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1).topk(self.k, dim=-1).indices
