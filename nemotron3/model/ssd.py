"""Mamba-2 state-space duality (SSD): the chunked scan, the single recurrent step, and a naive reference.

The recurrence
--------------
Per head h (with head dim P and state size N), Mamba-2 keeps a state S_t ∈ R^{P×N} and, for every token t,

    S_t = exp(dt_t · A_h) · S_{t-1}  +  dt_t · x_t ⊗ B_t          (x_t ∈ R^P, B_t ∈ R^N)
    y_t = S_t · C_t  +  D_h · x_t                                  (C_t ∈ R^N)

A_h < 0 is one scalar per head, dt_t > 0 one scalar per head and token (already softplus-ed and clamped by
the caller), and B, C are shared by the `heads / groups` heads of a group (like GQA's shared keys).
`ssd_naive` runs exactly this loop; it is the obviously-correct reference.

The chunked form (what training and prefill use)
-----------------------------------------------
Unrolling the recurrence gives y = M · x with a lower-triangular, semiseparable M:

    M[t, s] = (C_t · B_s) · exp(a_{s+1} + … + a_t) · dt_s       for s ≤ t,   a_t = dt_t · A

Cutting the sequence into chunks of length L splits M into diagonal blocks (quadratic attention-like work
inside a chunk, L×L per chunk) and off-diagonal blocks, which factor through the state at chunk boundaries
(a_cum is the running sum of a inside each chunk):

  1. intra-chunk:   Y_diag = (CBᵀ ∘ exp(a_cum[l] − a_cum[s])) · (x·dt)       per chunk and head, (L×L)·(L×P)
  2. chunk states:  S_c    = Σ_s exp(a_{s+1..end}) · (x_s·dt_s) ⊗ B_s        state each chunk contributes
  3. inter-chunk:   S'_c   = exp(a_cum[end] of chunk c-1) · S'_{c-1} + S_{c-1}   state entering each chunk
  4. off-diagonal:  Y_off  = exp(a_cum[l]) · S'_c · C_l

Work is O(T·L) instead of O(T²), and steps 1, 2 and 4 are batched matmuls. Inside a chunk the decay is
the difference of two running sums, as in mamba_ssm's kernel (one subtraction, one exp, both ≤ 0 in the
lower triangle). Step 3 is the recurrence itself at chunk granularity, one multiply-add per chunk: it only
ever multiplies by decays ≤ 1, so nothing cancels however long the sequence. Everything runs in fp32
(inputs are upcast): the decays exp(Σ a) span many orders of magnitude.

Memory layout (what makes this fast on a CPU, where these tensors do not fit in cache and every pass over
them costs). x arrives as (b, t, h, p), straight out of the in_proj: "natural" order, time outside heads.
Steps 2 and 4 work per (chunk, group) on matrices whose rows are time and whose columns are the r·p
channels of the group's heads: in natural order those are strided views, which `bmm` takes without a
copy, one call per group. Only step 1 needs heads outside time (its L×L matrix differs per head), so x·dt
is copied once into that order. The output is assembled in natural order in one pass: no broadcast
copies of x, B and C before each matmul, and the chunk recurrence is a scan, not a (c+1)×(c+1) decay
matrix (the speed of this layout is in docs/results.md).

Shapes: b batch, t time, c chunks, l/s positions in a chunk, g groups, r heads per group (h = g·r), p head
dim, n state size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    x: (b, t, h, p); dt: (b, t, h) (post-softplus); A: (h,); B, C: (b, t, g, n); D: (h,) or None;
    initial_state: (b, h, p, n) or None.  Returns y (b, t, h, p) in fp32 and the final state (b, h, p, n) fp32.
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    L = chunk_size
    pad = (-t) % L
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:  # zero dt: no input and no decay, so padding changes neither outputs nor the final state
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (t + pad) // L
    bc = b * c

    a_cum = (dtf * A.float()).view(b, c, L, h).cumsum(2)  # (b, c, l, h)
    xdt = (xf * dtf[..., None]).view(b, c, L, h, p)  # (b, c, l, h, p), natural order
    Bc, Cc = Bf.view(b, c, L, g, n), Cf.view(b, c, L, g, n)

    # 1. intra-chunk, per head: heads outside time for the (l×s)·(s×p) products (the one copy of x·dt)
    a_h = a_cum.transpose(2, 3)  # (b, c, h, l)
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    # exponent -inf above the diagonal before exp: exp(+x) could overflow there, and inf·0 poisons backward
    decay_in = torch.exp((a_h[..., :, None] - a_h[..., None, :]).masked_fill(~causal, float("-inf")))  # (b,c,h,l,s)
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, g, l, s)
    M = decay_in.view(b, c, g, r, L, L) * CB[:, :, :, None]  # (b, c, g, r, l, s)
    y_diag = M.view(bc * h, L, L) @ xdt.transpose(2, 3).reshape(bc * h, L, p)  # (b·c·h, l, p)

    # 2. state each chunk adds, per group: (r·p × s)·(s × n) on strided views of natural order
    decay_to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # (b, c, l, h)
    # (unbind, not indexing in the loops: the backward of unbind is one stack, that of each index a zero-filled
    # tensor of the full size)
    xs = (xdt * decay_to_end[..., None]).view(bc, L, g, r * p).unbind(2)  # g × (b·c, s, r·p)
    Bg = Bc.view(bc, L, g, n).unbind(2)  # g × (b·c, s, n)
    states = torch.stack([x_i.transpose(1, 2) @ B_i for x_i, B_i in zip(xs, Bg)], dim=1)  # (b·c, g, r·p, n)
    states = states.view(b, c, h, p, n).unbind(1)  # c × (b, h, p, n)

    # 3. states entering each chunk: the recurrence at chunk granularity
    chunk_decay = torch.exp(a_cum[:, :, -1])[..., None, None].unbind(1)  # c × (b, h, 1, 1)
    S = initial_state.float() if initial_state is not None else states[0].new_zeros(b, h, p, n)
    entering = []
    for decay_j, state_j in zip(chunk_decay, states):
        entering.append(S)
        S = decay_j * S + state_j
    entering = torch.stack(entering, dim=1).view(bc, g, r * p, n).unbind(1)  # g × (b·c, r·p, n)

    # 4. the entering state read by every position: (l × n)·(n × r·p) per group, then natural order
    Cg = Cc.view(bc, L, g, n).unbind(2)  # g × (b·c, l, n)
    y_off = torch.stack([C_i @ S_i.transpose(1, 2) for C_i, S_i in zip(Cg, entering)], dim=2)  # (b·c, l, g, r·p)
    y = y_off.view(b, c, L, h, p) * torch.exp(a_cum)[..., None]  # (b, c, l, h, p), natural order
    y = y.add_(y_diag.view(b, c, h, L, p).transpose(2, 3)).view(b, c * L, h, p)[:, :t]  # + intra-chunk part
    if D is not None:
        y = y.addcmul_(x.float(), D.float()[:, None])  # + D·x
    return y, S


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step, updating `state` in place (decode).

    state: (b, h, p, n) any float dtype; x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n).  Returns y (b, h, p) fp32.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    r = h // g
    dtf = dt.float()
    dA = torch.exp(dtf * A.float())  # (b, h)
    s = state.float().view(b, g, r, p, n)
    dBx = (x.float() * dtf[..., None]).view(b, g, r, p, 1) * B.float().view(b, g, 1, 1, n)
    s = s * dA.view(b, g, r, 1, 1) + dBx
    state.copy_(s.view(b, h, p, n))
    y = (s @ C.float().view(b, g, 1, n, 1)).view(b, h, p)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token, written out with no tricks. Same contract as `ssd_chunked`."""
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    S = torch.zeros(b, h, p, n, device=x.device) if initial_state is None else initial_state.float().clone()
    Bh = B.float().repeat_interleave(r, dim=2)  # (b, t, h, n)
    Ch = C.float().repeat_interleave(r, dim=2)
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i].float() * A.float())  # (b, h)
        S = (decay[..., None, None] * S
             + dt[:, i].float()[..., None, None] * x[:, i].float()[..., None] * Bh[:, i, :, None, :])
        y = (S * Ch[:, i, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + D.float()[:, None] * x[:, i].float()
        ys.append(y)
    return torch.stack(ys, dim=1), S
