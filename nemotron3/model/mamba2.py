"""The Mamba-2 mixer of an `M` layer (docs/architecture.md §2).

    in_proj: H -> [z (d_inner) | xBC (d_inner + 2·G·N) | dt (heads)]
    xBC <- silu(causal depthwise conv1d(xBC))        kernel 4, left-padded, with bias (model/conv.py)
    x, B, C <- split(xBC)
    dt <- clamp(softplus(dt + dt_bias), dt_min, dt_max);  A = -exp(A_log)
    y <- SSD(x, dt, A, B, C) + D·x                   (ssd.py)
    y <- GatedRMSNorm(y, z)                          groups of d_inner / G
    out_proj: d_inner -> H

The dt clamp. transformers' NemotronH clamps dt to [time_step_min, ∞) in its chunked path (it sets
`time_step_limit = (config.time_step_min, inf)` and ignores the config's own `time_step_limit`), while its
single-step decode path does not clamp at all. We clamp in both paths, so that prefill and decode agree
exactly, with the lower bound `time_step_min` (as transformers' prefill does) and the upper bound
`time_step_limit[1]`. [UNCONFIRMED: mamba_ssm's default `dt_limit` is (0, ∞), and whether NVIDIA's training
stack clamps at time_step_min is not stated anywhere we could read.] The bounds are the attributes
`dt_min` / `dt_max` of each mixer, so they can be changed per model.

With a cache (`forward(x, cache)`, cache a layer handle of engine/cache.py), the layer continues a
sequence instead of starting one: the conv reads the row's last conv_kernel-1 inputs before the new ones
(the zero left padding of a fresh sequence is a zero conv state), and the SSD starts from the row's SSM
state. One new token runs the recurrent step (`ssd_step`); several run the chunked scan with
`initial_state`, which is the same function of the inputs (tests/engine/test_engine_model.py checks prefill +
steps against the full forward). Right padding is exact: a padding token gets dt = 0, which means no
input and no decay (exp(0·A) = 1), so the state after the padding is the state after the row's last real
token, and the new conv state is read at each row's own last real token. When the cache records states
for rollback (`per_step`), the tokens run one by one and the state after each is recorded.

`Mamba2Step` is the same layer for the fast decoder (engine/decode.py): weights packed once (dt_bias in
the in-projection's bias, the gated norm's weight folded into out_proj), t tokens of every cache row,
states updated in place, S·C as a multiply-and-sum (cheaper on CPU than a batched matmul of P×N by N×1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.conv import causal_conv1d
from nemotron3.model.norms import GatedRMSNorm
from nemotron3.model.packing import Packer, addmm, mm, pack_weight
from nemotron3.model.ssd import ssd_step
from nemotron3.model.ssd_kernels import ssd_scan
from nemotron3.model.state import StateSpec


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.d_inner = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        self.conv_kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.dt_min = float(config.time_step_min)
        self.dt_max = float(config.time_step_limit[1])
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads,
                                 bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.use_bias)

    @torch.no_grad()
    def init_weights(self, config: ModelConfig, n_layers: int) -> None:
        """transformers' init: A = 1..heads, D = 1, dt_bias = softplus⁻¹(dt) with dt ~ logU[dt_min, dt_max]
        floored at time_step_floor, conv1d as PyTorch's default, out_proj kaiming-uniform / √n_layers."""
        std = config.initializer_range
        nn.init.normal_(self.in_proj.weight, std=std)
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(self.num_heads) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.conv1d.reset_parameters()
        self.norm.weight.fill_(1.0)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        if config.rescale_prenorm_residual:
            self.out_proj.weight.div_(math.sqrt(n_layers))
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()

    def split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, t, conv_dim) -> x (b, t, h, p), B (b, t, g, n), C (b, t, g, n)."""
        b, t, _ = xbc.shape
        x, B, C = xbc.split([self.d_inner, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        return (
            x.reshape(b, t, self.num_heads, self.head_dim),
            B.reshape(b, t, self.n_groups, self.state_size),
            C.reshape(b, t, self.n_groups, self.state_size),
        )

    def discretize(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw dt (..., h) -> clamped softplus(dt + dt_bias) in fp32, and A = -exp(A_log) (h,)."""
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)
        return dt, -torch.exp(self.A_log.float())

    def conv(self, window: torch.Tensor) -> torch.Tensor:
        """window (b, K-1+t, C) -> (b, t, C): the causal depthwise conv (model/conv.py), before the SiLU."""
        return causal_conv1d(window, self.conv1d.weight[:, 0], self.conv1d.bias)

    def _conv_state_after(self, window: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """window (b, K-1+t, C), j (b,) -> (b, C, K-1): the K-1 conv inputs ending at each row's new token j."""
        K1 = self.conv_kernel - 1
        rows = (j[:, None] + 1 + torch.arange(K1, device=window.device))[:, :, None]  # (b, K-1, 1)
        return window.gather(1, rows.expand(-1, -1, window.shape[-1])).transpose(1, 2)

    @staticmethod
    def state_spec(config: ModelConfig, max_len: int) -> dict[str, StateSpec]:
        """Per row: the last K-1 conv inputs (conv_dim, K-1) and the SSM state (heads, head_dim, state_size)."""
        c = config
        return {
            "conv": StateSpec((c.mamba_conv_dim, c.conv_kernel - 1)),
            "ssm": StateSpec((c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size), dtype="ssm"),
        }

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden (b, t, H) -> (b, t, H): the whole sequence from a zero state, or continuing `cache`'s rows."""
        b, t, _ = hidden.shape
        zxbcdt = self.in_proj(hidden)  # (b, t, d_inner + conv_dim + heads)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        if cache is None:
            window = F.pad(xbc, (0, 0, self.conv_kernel - 1, 0))  # (b, K-1+t, C): zero history
        else:
            conv_state = cache.read("conv")  # (b, C, K-1)
            window = torch.cat([conv_state.transpose(1, 2).to(xbc.dtype), xbc], dim=1)  # history first
        xbc = F.silu(self.conv(window))  # (b, t, C)
        x, B, C = self.split_xbc(xbc)  # (b, t, h, p), (b, t, g, n), (b, t, g, n)
        dt, A = self.discretize(dt)  # (b, t, h) fp32
        if cache is None:
            y, _ = ssd_scan(x, dt, A, B, C, self.chunk_size, D=self.D)  # (b, t, h, p)
        else:
            y = self._continue(cache, window, x, dt, A, B, C)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y.to(hidden.dtype))

    def _continue(self, cache, window, x, dt, A, B, C) -> torch.Tensor:
        """The SSD from the cached state, storing the new states; y (b, t, h, p)."""
        t = x.shape[1]
        state = cache.read("ssm")  # (b, h, p, n)
        last = cache.last  # (b,) index of each row's last real token
        if cache.valid is not None:  # right padding: dt = 0 is no input and no decay
            dt = dt * (torch.arange(t, device=dt.device) <= last[:, None])[..., None]
        if t == 1 or cache.per_step:
            if cache.per_step:  # slot 0: the states before this forward
                cache.record(-1, conv=self._conv_state_after(window, torch.full_like(last, -1)), ssm=state)
            ys = []
            for i in range(t):
                ys.append(ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D=self.D))  # state updated in place
                if cache.per_step:  # padding re-records the last real token's state (dt = 0 left it unchanged)
                    cache.record(i, conv=self._conv_state_after(window, torch.clamp(last, max=i)), ssm=state)
            y, new_state = torch.stack(ys, dim=1), state  # (b, t, h, p)
        else:
            y, new_state = ssd_scan(x, dt, A, B, C, self.chunk_size, D=self.D, initial_state=state)
        new_conv = window[:, t:].transpose(1, 2) if cache.valid is None else self._conv_state_after(window, last)
        cache.write("conv", new_conv)
        cache.write("ssm", new_state)
        return y


class Mamba2Step:
    """The fused Mamba-2 layer of the fast decoder: `step(h, x, cache)` for t new tokens of every cache row.

    h (B·t, H) is the residual stream and x = RMSNorm(h) (row-major: row b's tokens are b·t .. b·t+t-1);
    returns h + mixer(x). The state tensors are updated in place; with a recording cache the state after
    each token goes to the rollback ring. Same mathematics as `Mamba2Mixer.forward` with a cache, up to
    float summation order (tests/engine/test_engine_decode.py).
    """

    def __init__(self, mixer: Mamba2Mixer, eps: float, pack: Packer | None = None) -> None:
        m = mixer
        self.d_inner, self.conv_dim, self.K = m.d_inner, m.conv_dim, m.conv_kernel
        self.heads, self.groups, self.p, self.n = m.num_heads, m.n_groups, m.head_dim, m.state_size
        self.eps = eps
        dtype = m.in_proj.weight.dtype  # the activations' dtype: fp32, or bf16 with the SSM arithmetic in fp32
        self.exact = dtype == torch.float32 and pack is None  # fp32: dt_bias folded into the addmm's bias
        self.w_in_t = pack_weight(m.in_proj.weight, pack)  # x · W_inᵀ: (d_inner + C + h) outputs
        dev = m.dt_bias.device  # the model's device: the fused copies live beside its weights
        self.dt_bias = m.dt_bias.float()
        self.in_bias = torch.cat([torch.zeros(m.d_inner + m.conv_dim, device=dev), self.dt_bias]) if self.exact \
            else None  # dt_bias inside the fp32 addmm; otherwise added to dt in fp32
        self.conv_w = m.conv1d.weight[:, 0].float().contiguous()  # (C, K): the conv runs in fp32
        self.conv_b = m.conv1d.bias.float() if m.conv1d.bias is not None else torch.zeros(m.conv_dim, device=dev)
        self.A = -torch.exp(m.A_log.float())  # (h,)
        self.D = m.D.float()
        # the gated norm's weight folded into out_proj's columns, in fp32, rounded once to the weights' dtype
        self.w_out_t = pack_weight(m.out_proj.weight.float() * m.norm.weight.float()[None, :], pack, dtype)
        self.dtype = dtype
        self.dt_min, self.dt_max = m.dt_min, m.dt_max

    def __call__(self, h: torch.Tensor, x: torch.Tensor, cache) -> torch.Tensor:
        di, C, K, t = self.d_inner, self.conv_dim, self.K, cache.t
        nh, g, p, n = self.heads, self.groups, self.p, self.n
        B = h.shape[0] // t
        conv_state, state = cache.read("conv"), cache.read("ssm")  # (B, C, K-1), (B, h, p, n)
        if self.exact:
            zxbcdt = torch.addmm(self.in_bias, x, self.w_in_t)  # (B·t, d_inner + C + h), dt_bias already added
            z, xbc, dt = zxbcdt[:, :di], zxbcdt[:, di : di + C], zxbcdt[:, di + C :]
        else:  # bf16 / packed: z, xBC in the activations' dtype (xBC is what the conv state stores), dt in fp32
            zxbcdt = mm(x, self.w_in_t)
            z, xbc, dt = zxbcdt[:, :di].float(), zxbcdt[:, di : di + C], zxbcdt[:, di + C :].float() + self.dt_bias
        if t == 1:
            window = torch.cat([conv_state, xbc[:, :, None]], dim=-1)  # (B, C, K)
            conv_state.copy_(window[:, :, 1:])
            xbc = F.silu(torch.sum(window * self.conv_w, dim=-1) + self.conv_b)  # (B, C)
        else:
            window = torch.cat([conv_state, xbc.view(B, t, C).transpose(1, 2)], dim=-1)  # (B, C, K-1+t)
            conv_state.copy_(window[:, :, t:])
            taps = window.unfold(2, K, 1)  # (B, C, t, K): token i's K conv inputs
            xbc = F.silu(torch.sum(taps * self.conv_w[:, None], dim=-1) + self.conv_b[:, None])  # (B, C, t)
            xbc = xbc.transpose(1, 2).reshape(B * t, C)
        gn, r = g * n, nh // g
        xs = xbc[:, :di].view(B, t, g, r, p)
        Bm = xbc[:, di : di + gn].view(B, t, g, 1, 1, n)
        Cm = xbc[:, di + gn :].view(B, t, g, 1, 1, n)
        dt = F.softplus(dt).clamp_(self.dt_min, self.dt_max).view(B, t, g, r)  # (B, t, g, r)
        dA = torch.exp(dt * self.A.view(g, r))
        dtx = (xs * dt[..., None])[..., None]  # (B, t, g, r, p, 1)
        ys = []
        if cache.per_step:  # the recurrence runs in the history slots: slot i+1 = the state after token i
            hist, conv_hist = cache.history("ssm"), cache.history("conv")  # (R+1, B, h, p, n), (R+1, B, C, K-1)
            conv_hist[: t + 1].copy_(window.unfold(2, K - 1, 1).permute(2, 0, 1, 3))  # slot i: window[i : i+K-1]
            hist[0].copy_(state)
            for i in range(t):
                s = hist[i + 1].view(B, g, r, p, n)
                torch.mul(hist[i].view(B, g, r, p, n), dA[:, i, :, :, None, None], out=s)
                s.addcmul_(dtx[:, i], Bm[:, i])  # S ← e^{dt·A} S + dt·x ⊗ B
                ys.append((s * Cm[:, i]).sum(-1))
            state.copy_(hist[t])
        else:
            s = state.view(B, g, r, p, n)
            for i in range(t):
                s.mul_(dA[:, i, :, :, None, None]).addcmul_(dtx[:, i], Bm[:, i])  # S ← e^{dt·A} S + dt·x ⊗ B
                ys.append((s * Cm[:, i]).sum(-1))  # S·C as a multiply-and-sum: (B, g, r, p)
        y = ys[0] if t == 1 else torch.stack(ys, dim=1)  # (B, [t,] g, r, p)
        y = y.reshape(B * t, nh, p).addcmul_(xs.reshape(B * t, nh, p), self.D[:, None]).view(B * t, di)  # + D·x
        y = y * F.silu(z)  # gated RMSNorm: gate, normalise per group (its weight is folded into w_out_t)
        y = F.rms_norm(y.view(B * t, g, di // g), (di // g,), None, self.eps).view(B * t, di)
        return addmm(h, y.to(self.dtype), self.w_out_t)
