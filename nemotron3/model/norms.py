"""RMSNorm, the gated group RMSNorm of the Mamba-2 mixer, and the relu² MLP.

All three normalise in fp32 whatever the parameter dtype, as transformers' NemotronH and Megatron do:
the mean of squares of a bf16 activation loses most of its bits otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.model.packing import Packer, addmm, mm, pack_weight


class RMSNorm(nn.Module):
    """y = weight · x / sqrt(mean(x²) + eps), computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(dtype)


class GatedRMSNorm(nn.Module):
    """The Mamba-2 output norm: gate first, then RMS-normalise in groups (`norm_before_gate=False`).

        y = x · silu(z);  y_g ← y_g / sqrt(mean(y_g²) + eps) for each group g of `group_size` channels;  y · weight

    Nemotron-H uses one group per SSM group (group_size = d_inner / n_groups), so the normalisation never
    mixes channels that belong to different B/C groups; a single group over d_inner would be a different model.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"gated norm width {dim} is not a multiple of its group size {group_size}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(z.float())
        *lead, d = h.shape
        h = h.view(*lead, d // self.group_size, self.group_size)  # (..., G, d/G)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.view(*lead, d).to(dtype)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, the only activation of Nemotron 3's MLPs and experts."""
    return F.relu(x).square()


class MLP(nn.Module):
    """Non-gated relu² MLP, `down(relu(up(x))²)`: the dense `-` layer and the MoE shared expert."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    @staticmethod
    def state_spec(config, max_len: int) -> dict:
        """Nothing: each token is processed alone."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


class MLPStep:
    """The fused dense layer of the fast decoder: `step(h, x, cache)` -> h + down(relu(up(x))²), x (N, H)."""

    def __init__(self, mlp: MLP, pack: Packer | None = None) -> None:
        self.w_up_t = pack_weight(mlp.up_proj.weight, pack)
        self.w_down_t = pack_weight(mlp.down_proj.weight, pack)

    def __call__(self, h: torch.Tensor, x: torch.Tensor, cache=None) -> torch.Tensor:
        return addmm(h, mm(x, self.w_up_t).relu_().square_(), self.w_down_t)
