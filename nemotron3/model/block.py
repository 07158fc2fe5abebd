"""Block: one layer of the hybrid, `x + mixer(RMSNorm(x))`, whatever its mixer (docs/architecture.md §1).

The layer kind is one character of the pattern: `M` Mamba-2, `*` attention, `E` MoE / LatentMoE, `-` dense
relu² MLP. The backbone and the MTP block both stack these, so they live here, below both.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.attention import Attention
from nemotron3.model.mamba2 import Mamba2Mixer
from nemotron3.model.moe import MoE
from nemotron3.model.norms import MLP, RMSNorm


def build_mixer(kind: str, config: ModelConfig) -> nn.Module:
    """The mixer module of one layer kind."""
    if kind == "M":
        return Mamba2Mixer(config)
    if kind == "*":
        return Attention(config)
    if kind == "E":
        return MoE(config)
    if kind == "-":
        return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    """`x + mixer(RMSNorm(x))`: every layer of the hybrid, whatever its mixer."""

    def __init__(self, kind: str, config: ModelConfig) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = build_mixer(kind, config)

    @torch.no_grad()
    def init_weights(self, config: ModelConfig, n_layers: int) -> None:
        self.norm.weight.fill_(1.0)
        if isinstance(self.mixer, MLP):
            for lin in (self.mixer.up_proj, self.mixer.down_proj):
                nn.init.normal_(lin.weight, std=config.initializer_range)
                if lin.bias is not None:
                    lin.bias.zero_()
        else:
            self.mixer.init_weights(config, n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H)."""
        return x + self.mixer(self.norm(x))

    def forward_cached(self, x: torch.Tensor, view, layer: int) -> torch.Tensor:
        """The same block continuing cached sequences (`view`: a CacheView; `layer`: its cache index)."""
        if self.kind in "M*":
            return x + self.mixer.forward_cached(self.norm(x), view, layer)
        return x + self.mixer(self.norm(x))  # MoE and MLP act on each token alone: nothing to cache
