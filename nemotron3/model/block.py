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
from nemotron3.model.recompute import checkpointed
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
        self.checkpointing = False  # activation checkpointing of training forwards (model/recompute.py)

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
        """x (B, T, H) -> (B, T, H); `cache`: this layer's handle of a cached forward, or None.

        With `checkpointing` on, a cache-free forward under autograd keeps only x and recomputes the block in
        backward (model/recompute.py)."""
        if self.checkpointing and cache is None and torch.is_grad_enabled():
            return self._checkpointed(x)
        if self.kind in "M*":
            return x + self.mixer(self.norm(x), cache)
        return x + self.mixer(self.norm(x))  # MoE and MLP act on each token alone: nothing to cache

    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        """The block under activation checkpointing. The checkpointed region runs the mixer's `forward` without its
        hooks, the same code in the forward and in the recompute (torch checks that both save the same tensors);
        the mixer's forward hooks (train/balance.py's: routed loads, the router scores' aux loss) run here, outside
        the region, once per forward, on the region's outputs: what `self.mixer(h)` would have given them."""
        mixer = self.mixer
        if mixer._forward_pre_hooks or getattr(mixer, "_forward_hooks_with_kwargs", None):
            raise NotImplementedError(f"activation checkpointing: the {type(mixer).__name__} of a {self.kind!r} block "
                                      "has forward pre-hooks or keyword hooks, which a recompute cannot replay")

        def region(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = self.norm(x)
            out = mixer.forward(h)
            return x + out, h, out

        y, h, out = checkpointed(region, x)
        for hook in list(mixer._forward_hooks.values()):
            if hook(mixer, (h,), out) is not None:
                raise NotImplementedError(f"activation checkpointing: a forward hook on the {type(mixer).__name__} "
                                          "replaced its output, which the checkpointed block has already used")
        return y
