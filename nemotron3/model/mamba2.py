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

With a cache (`forward_cached`), the layer continues a sequence instead of starting one: the conv reads
the row's last conv_kernel-1 inputs before the new ones (the zero left padding of a fresh sequence is a
zero conv state), and the SSD starts from the row's SSM state. One new token runs the recurrent step
(`ssd_step`); several run the chunked scan with `initial_state`, which is the same function of the
inputs (tests/test_engine_model.py checks prefill + steps against the full forward). Right padding is
exact: a padding token gets dt = 0, which means no input and no decay (exp(0·A) = 1), so the state after
the padding is the state after the row's last real token, and the new conv state is read at each row's
own last real token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.conv import causal_conv1d
from nemotron3.model.norms import GatedRMSNorm
from nemotron3.model.ssd import ssd_chunked, ssd_step


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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (b, t, H) -> (b, t, H), the whole sequence from a zero state."""
        b, t, _ = hidden.shape
        zxbcdt = self.in_proj(hidden)  # (b, t, d_inner + conv_dim + heads)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        window = F.pad(xbc, (0, 0, self.conv_kernel - 1, 0))  # (b, K-1+t, conv_dim): zero history
        xbc = F.silu(self.conv(window))  # (b, t, conv_dim)
        x, B, C = self.split_xbc(xbc)
        dt, A = self.discretize(dt)
        y, _ = ssd_chunked(x, dt, A, B, C, self.chunk_size, D=self.D)  # (b, t, h, p)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y.to(hidden.dtype))

    def forward_cached(self, hidden: torch.Tensor, view, layer: int) -> torch.Tensor:
        """hidden (b, t, H) of the new tokens -> (b, t, H), continuing each row from its cached state.

        `view` is a `CacheView` (engine/cache.py); `layer` the index of this layer's slots in the cache.
        """
        b, t, _ = hidden.shape
        cache = view.cache
        conv_all, ssm_all = cache.conv[layer], cache.ssm[layer]  # (rows, C, K-1), (rows, h, p, n)
        conv_state = conv_all if view.rows is None else conv_all[view.index]
        state = ssm_all if view.rows is None else ssm_all[view.index]  # (b, h, p, n)
        zxbcdt = self.in_proj(hidden)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        window = torch.cat([conv_state.transpose(1, 2).to(xbc.dtype), xbc], dim=1)  # (b, K-1+t, C): history first
        xbc = F.silu(self.conv(window))  # (b, t, C)
        x, B, C = self.split_xbc(xbc)  # (b, t, h, p), (b, t, g, n), (b, t, g, n)
        dt, A = self.discretize(dt)  # (b, t, h) fp32
        last = view.last  # (b,) index of each row's last real token
        if view.valid is not None:  # right padding: dt = 0 is no input and no decay
            dt = dt * (torch.arange(t, device=dt.device) <= last[:, None])[..., None]
        if t == 1 or view.per_step:
            ys = []
            for i in range(t):
                ys.append(ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D=self.D))  # state updated in place
                if view.per_step:  # padding re-records the last real token's state (dt = 0 left it unchanged)
                    j = torch.clamp(last, max=i)
                    conv_i = self._conv_state_after(window, j)  # conv state after token j
                    cache.record(layer, view.index, view.start + j, conv_i, state)
            y = torch.stack(ys, dim=1)  # (b, t, h, p)
            new_state = state
        else:
            y, new_state = ssd_chunked(x, dt, A, B, C, self.chunk_size, D=self.D, initial_state=state)
        if view.valid is None:
            new_conv = window[:, t:].transpose(1, 2)  # (b, C, K-1)
        else:
            new_conv = self._conv_state_after(window, last)
        if cache.max_rollback and not view.per_step:
            cache.record(layer, view.index, view.start + last, new_conv, new_state)
        if view.rows is None:
            conv_all.copy_(new_conv)
            if new_state is not ssm_all:
                ssm_all.copy_(new_state)
        else:
            conv_all[view.index] = new_conv.to(conv_all.dtype)
            ssm_all[view.index] = new_state.to(ssm_all.dtype)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y.to(hidden.dtype))
