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

  1. intra-chunk:   Y_diag = (CBᵀ ∘ exp(a_cum[l] − a_cum[s])) · (x·dt)       per chunk, (L×L)·(L×P)
  2. chunk states:  S_c    = Σ_s exp(a_{s+1..end}) · (x_s·dt_s) ⊗ B_s        state each chunk contributes
  3. inter-chunk:   S'_c   = Σ_{z≤c} exp(sum of chunk decays z+1..c) · S_z    state entering each chunk
  4. off-diagonal:  Y_off  = exp(a_{start..t}) · S'_{c-1} · C_t

Work is O(T·L) instead of O(T²), and every step is a batched matmul. Inside a chunk the decay is the
difference of two running sums, as in mamba_ssm's kernel (one subtraction, one exp). Across chunks, where
the sums grow with the sequence length, `segsum` builds each entry as a masked cumulative sum of only the
terms it needs, so no large running sums cancel. Everything runs in fp32 (inputs are upcast): the decays
exp(Σ a) span many orders of magnitude.

Shapes: b batch, t time, c chunks, l/s positions in a chunk, g groups, r heads per group (h = g·r), p head
dim, n state size. Heads are kept as (g, r) so B and C are never repeated across the heads of a group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L) with out[i, j] = a[j+1] + … + a[i] for i ≥ j and −inf above the diagonal."""
    L = a.size(-1)
    x = a[..., None].expand(*a.shape, L)  # x[..., k, j] = a[k]
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)  # keep terms k > j
    s = x.cumsum(-2)  # s[i, j] = Σ_{j<k≤i} a[k]
    lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(0)
    return s.masked_fill(~lower, float("-inf"))


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

    xdt = (xf * dtf[..., None]).view(b, c, L, g, r, p)  # (b, c, l, g, r, p)
    Bc = Bf.view(b, c, L, g, n)
    Cc = Cf.view(b, c, L, g, n)
    a = (dtf * A.float()).view(b, c, L, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
    a_cum = a.cumsum(-1)  # (b, g, r, c, l)

    # 1. intra-chunk (diagonal blocks). Within one chunk the decay is exp(a_cum[l] - a_cum[s]), the form
    # mamba_ssm's kernel uses; above the diagonal the exponent is set to -inf before exp (exp(+x) could
    # overflow, and inf·0 would poison the backward pass).
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay_in = torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~causal, float("-inf")))
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)  # (b, g, c, l, s)
    M = decay_in * CB[:, :, None]  # (b, g, r, c, l, s)
    xdt_g = xdt.permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, s, p)
    y = M @ xdt_g  # (b, g, r, c, l, p)

    # 2. the state each chunk adds, decayed to the chunk's end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, g, r, c, l)
    Bg = Bc.permute(0, 3, 1, 2, 4)[:, :, None]  # (b, g, 1, c, l, n)
    states = (xdt_g * decay_to_end[..., None]).transpose(-1, -2) @ Bg  # (b, g, r, c, p, n)

    # 3. states entering each chunk: a (c+1)×(c+1) decay matrix over chunk boundaries
    if initial_state is None:
        init = states.new_zeros(b, g, r, 1, p, n)
    else:
        init = initial_state.float().view(b, g, r, 1, p, n)
    states = torch.cat([init, states], dim=3)  # (b, g, r, c+1, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bgrcpn->bgrzpn", chunk_decay, states)
    entering, final = states[:, :, :, :-1], states[:, :, :, -1]  # (b,g,r,c,p,n), (b,g,r,p,n)

    # 4. contribution of the entering state to each position
    Cg = Cc.permute(0, 3, 1, 2, 4)[:, :, None]  # (b, g, 1, c, l, n)
    y = y + (Cg @ entering.transpose(-1, -2)) * torch.exp(a_cum)[..., None]  # (b, g, r, c, l, p)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * L, h, p)[:, :t]  # (b, t, h, p)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y, final.reshape(b, h, p, n)


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
        S = decay[..., None, None] * S + dt[:, i].float()[..., None, None] * x[:, i].float()[..., None] * Bh[:, i, :, None, :]
        y = (S * Ch[:, i, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + D.float()[:, None] * x[:, i].float()
        ys.append(y)
    return torch.stack(ys, dim=1), S
