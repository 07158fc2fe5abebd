"""Block: one layer of the hybrid, `x + mixer(RMSNorm(x))`, whatever its mixer (docs/architecture.md §1).

The layer kind is one character of the pattern: `M` Mamba-2, `*` attention, `E` MoE / LatentMoE, `-` dense
relu² MLP. The backbone and the MTP block both stack these, so they live here, below both.

Every mixer has one `forward(x, cache=None)`: without a cache it processes a whole sequence from a fresh
state; with one (a layer handle of engine/cache.py, see model/state.py) it continues the cached sequences.
Beside each mixer, in its file, is the fused step the fast decoder runs (`Mamba2Step`, `AttentionStep`,
`MoEStep`, `MLPStep`), tested against that forward.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.attention import Attention
from nemotron3.model.mamba2 import Mamba2Mixer
from nemotron3.model.moe import MoE
from nemotron3.model.norms import MLP, RMSNorm
from nemotron3.model.state import StateSpec

MIXERS: dict[str, type[nn.Module]] = {"M": Mamba2Mixer, "*": Attention, "E": MoE, "-": MLP}


def build_mixer(kind: str, config: ModelConfig) -> nn.Module:
    """The mixer module of one layer kind."""
    if kind not in MIXERS:
        raise ValueError(f"unknown layer kind {kind!r}")
    if kind == "-":
        return MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    return MIXERS[kind](config)


def state_spec(kind: str, config: ModelConfig, max_len: int) -> dict[str, StateSpec]:
    """The per-row decode state one layer of `kind` declares (model/state.py), for sequences of max_len."""
    if kind not in MIXERS:
        raise ValueError(f"unknown layer kind {kind!r}")
    return MIXERS[kind].state_spec(config, max_len)


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

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H); `cache`: this layer's handle of a cached forward, or None."""
        if self.kind in "M*":
            return x + self.mixer(self.norm(x), cache)
        return x + self.mixer(self.norm(x))  # MoE and MLP act on each token alone: nothing to cache
