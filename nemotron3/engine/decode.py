"""The decode fast path: one token per row through the whole model in as few tensor ops as we can manage.

Why a second implementation
---------------------------
At the sizes a CPU serves, a decode step does almost no arithmetic: it multiplies the weight matrices by
one vector per row. What costs is the number of tensor ops, each paying a fixed dispatch cost in eager
PyTorch, and the reference cached path (`HybridLM.forward` with a cache) spends hundreds of them on
generality: row gathers and scatters, padding masks, fp32 casts, separate q/k/v projections, the grouped
MoE with its sort and `.tolist()`. This module runs the same mathematics with everything that can be
decided once hoisted out of the step (docs/inference.md §3):

* weights fused at build time, from the model's own tensors: q|k|v in one matrix; for each MoE layer
  router | fc1_latent_proj | shared up_proj in one matrix (all three read the same normed input) and
  fc2_latent_proj | shared down_proj side by side (their outputs are summed, so one matmul over the
  concatenated inputs does both); A = -exp(A_log) precomputed;
* every row of the cache is decoded (no gathers), and the state tensors are updated in place;
* residual adds folded into `addmm`, RMSNorm as one `F.rms_norm`;
* routed experts: for a handful of tokens (B·k < E) one GEMV pair per (row, chosen expert), reading
  only those experts; for more rows the pairs are grouped by expert and each expert runs one GEMM pair
  on its rows (every expert's weights read once, no wasted FLOPs); from B·k >= 2E (`padded_min_pairs`)
  all experts run as one padded batched matmul pair, two calls instead of ~2E (the measurements behind
  that threshold: docs/results.md). The compiled variant (below) cannot sync with the host: it reads
  the chosen experts by indexing inside one fused loop while that reads each expert at most ~4 times
  (B·k <= 4E), and beyond runs every expert densely with weight 0 for the ones not chosen;
* S·C as a multiply-and-sum, which is cheaper on CPU than a batched matmul of P×N by N×1 matrices.

The maths is the reference's up to float summation order (tests/test_engine_decode.py compares the two
step by step to 1e-4). Fused tensors are copies: `FastDecoder.is_stale()` notices in-place updates of the
model's weights (RL updates them between rollouts) through the tensors' version counters, replaced
tensors and swapped modules through their identities, and the Engine rebuilds before the next call.
The copies cost about one more copy of the model's weights in memory (experts included), fine at the
sizes a CPU decodes.

`FastDecoder.supports(model)` is False, and the Engine uses the reference path, for models this module
does not cover: layers swapped for quantized ones (quant/convert.py; they are not plain `nn.Linear`s),
dtypes other than fp32, and projection biases (`mlp_bias` / `use_bias`, which the Nemotron 3 checkpoints
do not use, so the step does not carry them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.model.hybrid import HybridLM


@dataclass
class _Mamba:
    index: int  # the layer's index in the cache
    norm: torch.Tensor  # (H,)
    w_in_t: torch.Tensor  # (H, d_inner + C + h)
    in_bias: torch.Tensor  # (d_inner + C + h,): zeros, then dt_bias (added by the in_proj addmm)
    conv_w: torch.Tensor  # (C, K)
    conv_b: torch.Tensor  # (C,)
    A: torch.Tensor  # (h,) = -exp(A_log)
    D: torch.Tensor  # (h,)
    w_out_t: torch.Tensor  # (d_inner, H), rows scaled by the gated norm's weight
    dt_min: float
    dt_max: float


@dataclass
class _Attn:
    index: int  # the layer's index in the cache
    norm: torch.Tensor
    w_qkv_t: torch.Tensor  # (H, (hq + 2 hk)·d)
    w_o_t: torch.Tensor  # (hq·d, H)


@dataclass
class _MoE:
    norm: torch.Tensor
    w_in_t: torch.Tensor  # (H, E [+ ℓ] [+ I_s]): router | fc1_latent | shared up
    w_out_t: torch.Tensor | None  # (ℓ + I_s, H): fc2_latent | shared down, stacked
    up: torch.Tensor  # (E, I, ℓ), the model's own tensor
    down: torch.Tensor  # (E, ℓ, I), the model's own tensor
    up_t: torch.Tensor | None  # (ℓ, E·I): column block e is expert e's up_projᵀ (compiled dense path)
    down_t: torch.Tensor  # (E·I, ℓ): row block e is expert e's down_projᵀ
    correction_bias: torch.Tensor  # (E,) the router's e_score_correction_bias (steers the selection only)
    inter: int  # I, the expert width
    latent: bool
    shared: bool
    up_blocks: torch.Tensor | None = None  # (E, ℓ, I): block e is expert e's up_projᵀ, contiguous
    down_blocks: torch.Tensor | None = None  # (E, I, ℓ): block e is expert e's down_projᵀ (view of down_t)

    def __post_init__(self) -> None:
        self.up_e = list(self.up_blocks.unbind(0))  # per-expert views, for the few-pair GEMV loop
        self.down_e = list(self.down_blocks.unbind(0))


@dataclass
class _MLP:
    norm: torch.Tensor
    w_up_t: torch.Tensor
    w_down_t: torch.Tensor


class FastDecoder:
    """`step(tokens, cache, n_keys, uniform)` -> logits (B, V): the next token of every cache row.

    traceable=True selects the variant written for `torch.compile` (no host sync: the chosen experts are
    read by indexing inside one fused multiply-and-sum, which inductor turns into a loop over the
    selected weights; in eager mode that form would materialise (B·k, I, ℓ) products).
    """

    def __init__(self, model: HybridLM, traceable: bool = False) -> None:
        if not self.supports(model):
            raise ValueError(
                "FastDecoder needs an fp32 HybridLM of plain nn.Linear layers without biases; use the reference path")
        c = model.config
        self.model = model
        self.traceable = traceable
        self.padded_min_pairs = 2 * c.n_routed_experts  # B·k from which the padded batched experts run
        self.config = c
        self.eps = c.layer_norm_epsilon
        self.E, self.k = c.n_routed_experts, c.num_experts_per_tok
        self.scaling, self.norm_topk = float(c.routed_scaling_factor), c.norm_topk_prob
        self.grouped_routing = c.n_group > 1
        self.hq, self.hk, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.mamba_heads, self.mamba_head_dim = c.mamba_num_heads, c.mamba_head_dim
        self.mamba_groups, self.state_size = c.n_groups, c.ssm_state_size
        self.d_inner, self.conv_dim = c.mamba_intermediate_size, c.mamba_conv_dim
        self._build()

    @staticmethod
    def supports(model: HybridLM) -> bool:
        """Plain fp32 modules without projection biases only (quantized or bf16 models, and models built
        with `mlp_bias` / `use_bias`, run the reference cached path)."""
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and (type(mod) is not nn.Linear or mod.bias is not None):
                return False
            if mod.__dict__.get("gemm_quantizer") is not None:
                return False
        return all(p.dtype == torch.float32 for p in model.parameters())

    def _signature(self) -> tuple:
        """(identity, version) of every weight, and the identity of every module: changes when a weight is
        replaced or updated in place, or a module swapped (quantization)."""
        tensors = list(self.model.parameters())
        tensors += [b for name, b in self.model.named_buffers() if name.endswith("e_score_correction_bias")]
        return tuple((id(t), 0 if t.is_inference() else t._version) for t in tensors) + tuple(
            id(m) for m in self.model.modules())

    def is_stale(self) -> bool:
        """True if a weight or module of the model changed since the fused copies were made."""
        return self._signature() != self._versions

    @torch.no_grad()
    def _build(self) -> None:
        model = self.model

        def transposed(w: torch.Tensor) -> torch.Tensor:  # (out, in) -> contiguous (in, out): x @ Wᵀ as a GEMV
            return w.t().contiguous()

        self.emb = model.backbone.embeddings.weight
        self.norm_f = model.backbone.norm_f.weight
        self.head_t = transposed(model.lm_head.weight)  # (H, V)
        self.layers: list = []
        for i, block in enumerate(model.backbone.layers):
            mixer, norm = block.mixer, block.norm.weight
            if block.kind == "M":
                conv_b = mixer.conv1d.bias if mixer.conv1d.bias is not None else torch.zeros(mixer.conv_dim)
                in_bias = torch.cat([torch.zeros(mixer.d_inner + mixer.conv_dim), mixer.dt_bias.float()])
                w_out_t = mixer.norm.weight[:, None] * transposed(mixer.out_proj.weight)  # gated norm's weight folded
                self.layers.append(_Mamba(
                    i, norm, transposed(mixer.in_proj.weight), in_bias, mixer.conv1d.weight[:, 0].contiguous(), conv_b,
                    -torch.exp(mixer.A_log.float()), mixer.D, w_out_t, mixer.dt_min, mixer.dt_max))
            elif block.kind == "*":
                w_qkv = torch.cat([mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight])
                self.layers.append(_Attn(i, norm, transposed(w_qkv), transposed(mixer.o_proj.weight)))
            elif block.kind == "E":
                latent, shared = mixer.fc1_latent_proj is not None, mixer.shared_experts is not None
                ins = [mixer.gate.weight] + ([mixer.fc1_latent_proj.weight] if latent else [])
                ins += [mixer.shared_experts.up_proj.weight] if shared else []
                outs = [mixer.fc2_latent_proj.weight] if latent else []
                outs += [mixer.shared_experts.down_proj.weight] if shared else []
                up, down = mixer.experts.up_proj, mixer.experts.down_proj  # (E, I, ℓ), (E, ℓ, I)
                E, inter, ell = up.shape
                up_blocks = up.transpose(1, 2).contiguous()  # (E, ℓ, I): one contiguous block per expert
                down_t = down.transpose(1, 2).reshape(E * inter, ell).contiguous()  # (E·I, ℓ), the same per block
                up_t = up_blocks.permute(1, 0, 2).reshape(ell, E * inter) if self.traceable else None  # dense form
                self.layers.append(_MoE(
                    norm, transposed(torch.cat(ins)), transposed(torch.cat(outs, dim=1)) if outs else None, up, down,
                    up_t, down_t, mixer.gate.e_score_correction_bias, inter, latent, shared,
                    up_blocks, down_t.view(E, inter, ell)))
            else:
                self.layers.append(_MLP(norm, transposed(mixer.up_proj.weight), transposed(mixer.down_proj.weight)))
        self._versions = self._signature()

    def refresh(self) -> None:
        """Rebuild the fused copies from the model's current weights."""
        self._build()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache, n_keys: int | None = None, uniform: bool = False) -> torch.Tensor:
        """tokens (B,) for cache rows 0..B-1 -> logits (B, V) fp32; appends one token to every row.

        n_keys = max(lengths) + 1 limits attention to the keys some row holds; `uniform` says all rows
        have the same length (no mask needed, and the new keys go to one column). n_keys=None attends over
        the cache's whole capacity with a mask built from `cache.lengths`: every shape is then fixed by
        (rows, max_seq_len), which is what `torch.compile` needs to compile the step once (the masked
        tail costs at most the unused capacity). The caller advances `cache.lengths` (the Engine does it
        once per step, not per layer).
        """
        if cache.max_rollback:
            raise ValueError(
                "FastDecoder does not record rollback history; decode this cache with model(..., cache=)")
        B = tokens.shape[0]
        n = cache.max_seq_len if n_keys is None else n_keys
        mask = None if (uniform and n_keys is not None) else (
            torch.arange(n, device=tokens.device) <= cache.lengths[:, None]).view(B, 1, 1, n)
        h = F.embedding(tokens, self.emb)  # (B, H)
        for layer in self.layers:
            x = F.rms_norm(h, (h.shape[-1],), layer.norm, self.eps)
            if isinstance(layer, _Mamba):
                h = self._mamba(h, x, layer, cache)
            elif isinstance(layer, _Attn):
                h = self._attn(h, x, layer, cache, n, mask)
            elif isinstance(layer, _MoE):
                h = self._moe(h, x, layer)
            else:
                h = torch.addmm(h, torch.mm(x, layer.w_up_t).relu_().square_(), layer.w_down_t)
        h = F.rms_norm(h, (h.shape[-1],), self.norm_f, self.eps)
        return torch.mm(h, self.head_t)

    def _mamba(self, h: torch.Tensor, x: torch.Tensor, layer: _Mamba, cache) -> torch.Tensor:
        B, di, C = h.shape[0], self.d_inner, self.conv_dim
        nh, g, p, n = self.mamba_heads, self.mamba_groups, self.mamba_head_dim, self.state_size
        conv_state, state = cache.conv[layer.index], cache.ssm[layer.index]  # (B, C, K-1), (B, h, p, n)
        zxbcdt = torch.addmm(layer.in_bias, x, layer.w_in_t)  # (B, d_inner + C + h), dt_bias already added
        z, xbc, dt = zxbcdt[:, :di], zxbcdt[:, di : di + C], zxbcdt[:, di + C :]
        window = torch.cat([conv_state, xbc[:, :, None]], dim=-1)  # (B, C, K)
        conv_state.copy_(window[:, :, 1:])
        xbc = F.silu(torch.sum(window * layer.conv_w, dim=-1) + layer.conv_b)  # (B, C)
        gn, r = g * n, nh // g
        xs = xbc[:, :di].view(B, g, r, p)  # (B, g, r, p)
        Bm = xbc[:, di : di + gn].view(B, g, 1, 1, n)
        Cm = xbc[:, di + gn :]
        dt = F.softplus(dt).clamp_(layer.dt_min, layer.dt_max)  # (B, h)
        dA = torch.exp(dt * layer.A).view(B, g, r, 1, 1)
        s = state.view(B, g, r, p, n)
        s.mul_(dA).addcmul_((xs * dt.view(B, g, r, 1))[..., None], Bm)  # S ← e^{dt·A} S + dt·x ⊗ B
        y = (s * Cm.view(B, g, 1, 1, n)).sum(-1).view(B, nh, p)  # S·C as a multiply-and-sum, not a batched matmul
        y = y.addcmul_(xs.view(B, nh, p), layer.D[:, None]).view(B, di)  # + D·x
        y = y * F.silu(z)  # gated RMSNorm: gate, normalise per group (its weight is folded into w_out_t)
        y = F.rms_norm(y.view(B, g, di // g), (di // g,), None, self.eps).view(B, di)
        return torch.addmm(h, y, layer.w_out_t)

    def _attn(self, h, x, layer: _Attn, cache, n: int, mask) -> torch.Tensor:
        B, hq, hk, d = h.shape[0], self.hq, self.hk, self.d
        qkv = torch.mm(x, layer.w_qkv_t)  # (B, (hq + 2hk)·d)
        q = qkv[:, : hq * d].view(B, hq, 1, d)
        k, v = qkv[:, hq * d : (hq + hk) * d].view(B, hk, d), qkv[:, (hq + hk) * d :].view(B, hk, d)
        K, V = cache.key[layer.index], cache.value[layer.index]  # (B, hk, T_max, d)
        if mask is None:  # all rows at the same length n - 1
            K.select(2, n - 1).copy_(k)
            V.select(2, n - 1).copy_(v)
        else:  # each row at its own length
            rows = torch.arange(B, device=h.device)
            K[rows, :, cache.lengths] = k
            V[rows, :, cache.lengths] = v
        y = F.scaled_dot_product_attention(
            q, K[:, :, :n], V[:, :, :n], attn_mask=mask, scale=d**-0.5, enable_gqa=hq != hk)
        return torch.addmm(h, y.view(B, hq * d), layer.w_o_t)

    def _moe(self, h, x, layer: _MoE) -> torch.Tensor:
        B, E, k, inter = h.shape[0], self.E, self.k, layer.inter
        fused = torch.mm(x, layer.w_in_t)  # (B, E + ℓ + I_s): router logits | latent input | shared up_proj
        scores = torch.sigmoid(fused[:, :E])  # (B, E)
        if self.grouped_routing:  # rare (n_group > 1): the reference router's selection rule
            idx = self._grouped_topk(scores + layer.correction_bias)
        else:
            idx = torch.topk(scores + layer.correction_bias, k, dim=-1, sorted=False).indices  # (B, k)
        w = scores.gather(1, idx)  # (B, k) router weights of the chosen experts, not yet normalised
        ell = layer.up.shape[-1]
        z = fused[:, E : E + ell] if layer.latent else x  # (B, ℓ)
        if B * k < E and not self.traceable:  # few (row, expert) pairs: one GEMV pair each, chosen experts only
            y = torch.zeros(B, ell)
            for b, (experts, ws) in enumerate(zip(idx.tolist(), w.tolist())):  # weights normalised on the host
                scale = self.scaling / (sum(ws) + 1e-20) if self.norm_topk else self.scaling
                zb, yb = z[b : b + 1], y[b : b + 1]
                for e, we in zip(experts, ws):
                    yb.addmm_(torch.mm(zb, layer.up_e[e]).relu_().square_(), layer.down_e[e], alpha=we * scale)
            return self._moe_out(h, fused, y, layer)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * self.scaling
        if self.traceable and B * k <= 4 * E:  # compiled, <= ~4 reads per expert: fused indexed multiply-and-sum
            flat = idx.reshape(-1)  # (B·k,)
            hid = (layer.up[flat] * z.repeat_interleave(k, dim=0)[:, None, :]).sum(-1).relu().square()  # (B·k, I)
            out = (layer.down[flat] * hid[:, None, :]).sum(-1).view(B, k, ell)  # (B·k, ℓ)
            y = (out * w[:, :, None]).sum(1)  # (B, ℓ)
        elif self.traceable:  # compiled, many more rows: every expert for every row, weight 0 where not chosen
            dense_w = torch.zeros(B, E).scatter_(1, idx, w)  # (B, E)
            hid = torch.mm(z, layer.up_t).relu_().square_().view(B, E, inter)  # (B, E, I)
            y = torch.mm((hid * dense_w[:, :, None]).view(B, E * inter), layer.down_t)  # (B, ℓ)
        elif B * k < self.padded_min_pairs:  # several rows: one GEMM pair per chosen expert on its rows
            y = self._experts_grouped(z, idx, w, layer)
        else:  # many rows: every expert runs its rows as one slice of a padded batched matmul pair
            y = self._experts_padded(z, idx, w, layer)
        return self._moe_out(h, fused, y, layer)

    def _experts_grouped(self, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, layer: _MoE) -> torch.Tensor:
        """z (B, ℓ), idx (B, k), w (B, k) -> (B, ℓ): the (row, expert) pairs sorted by expert, one GEMM pair
        per expert that has rows (only the chosen experts' weights are read)."""
        B, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort()
        rows = order // k
        counts = torch.bincount(flat, minlength=self.E).tolist()
        outs = []
        for e, zs in enumerate(z.index_select(0, rows).split(counts)):
            if counts[e]:
                outs.append(torch.mm(torch.mm(zs, layer.up_e[e]).relu_().square_(), layer.down_e[e]))
        ys = torch.cat(outs).mul_(w.reshape(-1)[order, None])  # (B·k, ℓ)
        return torch.zeros(B, z.shape[1]).index_add_(0, rows, ys)

    def _experts_padded(self, z: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, layer: _MoE) -> torch.Tensor:
        """z (B, ℓ), idx (B, k), w (B, k) combine weights -> routed output (B, ℓ), for B·k >= padded_min_pairs.

        Pair i = (row b, slot j) gets slot `pos` = how many earlier pairs chose the same expert, so expert e's
        rows sit in X[e, :count_e]; X is (E, m, ℓ) with m = the largest count, and two `bmm`s run every
        expert at once. Unused slots are zero rows (relu² of 0 is 0, so they stay zero and are never read).
        Two calls replace the ~2E small, dispatch-bound calls of one GEMM pair per expert, for at most
        m·E / (B·k) times the useful FLOPs.
        """
        B, k = idx.shape
        E, ell = self.E, z.shape[-1]
        flat = idx.reshape(-1)  # (B·k,)
        onehot = F.one_hot(flat, E)  # (B·k, E)
        pos = (onehot.cumsum(0) - 1).gather(1, flat[:, None])[:, 0]  # (B·k,) rank within the expert
        m = int(onehot.sum(0).max())
        X = z.new_zeros(E, m, ell)
        X[flat, pos] = z.repeat_interleave(k, dim=0)
        Y = torch.bmm(torch.bmm(X, layer.up_blocks).relu_().square_(), layer.down_blocks)  # (E, m, ℓ)
        return (Y[flat, pos].view(B, k, ell) * w[:, :, None]).sum(1)

    def _moe_out(self, h: torch.Tensor, fused: torch.Tensor, y: torch.Tensor, layer: _MoE) -> torch.Tensor:
        """Residual + fc2_latent_proj(y) + shared expert, as one addmm over [y | relu²(shared up)]; `fused` is
        the output of the layer's fused in-projection (router logits | latent input | shared up_proj)."""
        E, ell = self.E, layer.up.shape[-1]
        if layer.w_out_t is None:
            return h + y
        if not layer.latent:  # plain MoE: the routed output is already in H; w_out is the shared down_proj
            return torch.addmm(h + y, fused[:, E:].relu().square_(), layer.w_out_t)
        if layer.shared:
            y = torch.cat([y, fused[:, E + ell :].relu().square_()], dim=1)  # (B, ℓ + I_s)
        return torch.addmm(h, y, layer.w_out_t)

    def _grouped_topk(self, choice: torch.Tensor) -> torch.Tensor:
        c = self.config
        N = choice.shape[0]
        grouped = choice.view(N, c.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(c.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1).topk(self.k, dim=-1).indices
