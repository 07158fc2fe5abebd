"""Multi-token prediction (MTP): the DeepSeek-V3-style block Nemotron 3 Super uses for speculative drafts.

One MTP *module* is a short stack of ordinary blocks (`mtp_pattern`, `*E` for Super: one attention layer,
one LatentMoE layer) with a fusion step before it and a norm after it (docs/architecture.md §6):

    u   = eh_proj( concat[ enorm(Emb(token_{t+k})), hnorm(h_{k-1}[t]) ] )     2H -> H, order [embedding, hidden]
    u   = u + mixer(RMSNorm(u))      for each character of mtp_pattern
    h_k = final_layernorm(u)
    logits_k[t] = lm_head(h_k[t])    predicts token t+k+1

h_0 is the backbone's output after `norm_f`; the embedding and lm_head are the backbone's (shared).
Checkpoints hold `num_nextn_predict_layers` modules, flattened: `mtp.layers.{i}` for i over
modules × pattern, the first layer of each module carrying `enorm`, `hnorm`, `eh_proj` and the last one
`final_layernorm` (the names vLLM and Megatron-Bridge use). Super has one module and *trains it for two
depths with shared weights* (`mtp_num_layers=2`, `mtp_use_repeated_layer=True` in Megatron-Bridge); depth k
uses module (k-1) mod num_modules, so any number of depths can run on the modules a checkpoint holds.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.block import Block
from nemotron3.model.norms import RMSNorm


class MTPModule:
    """A view over one module's layers (they are registered once, in `MTP.layers`, under checkpoint names).

    `first_cache_layer`: the cache layer index of its first layer (after the backbone's and the earlier
    modules'), so that the drafter can run it incrementally on a cache (engine/speculative.py).
    """

    def __init__(self, layers: list[nn.Module], first_cache_layer: int) -> None:
        self._layers = layers
        self.first_cache_layer = first_cache_layer

    @property
    def layers(self) -> list[nn.Module]:
        return self._layers

    def __call__(self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, cache=None) -> torch.Tensor:
        """prev_hidden (B, T, H) = h_{k-1}, next_embeds (B, T, H) = Emb(token_{t+k}) -> h_k (B, T, H).

        `cache`: a CacheView (engine/cache.py) whose positions are the MTP positions of the T inputs; the
        module's attention layers append to their own slots (the caller advances those positions).
        """
        first, last = self._layers[0], self._layers[-1]
        u = first.eh_proj(torch.cat([first.enorm(next_embeds), first.hnorm(prev_hidden)], dim=-1))
        for j, block in enumerate(self._layers):
            u = block(u, None if cache is None else cache.layer(self.first_cache_layer + j))
        return last.final_layernorm(u)


class MTP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.layer_norm_epsilon
        n = len(config.mtp_pattern)
        self.layers = nn.ModuleList()
        for _ in range(config.num_nextn_predict_layers):
            for i, kind in enumerate(config.mtp_pattern):
                block = Block(kind, config)
                if i == 0:
                    block.enorm = RMSNorm(H, eps)
                    block.hnorm = RMSNorm(H, eps)
                    block.eh_proj = nn.Linear(2 * H, H, bias=False)
                if i == n - 1:
                    block.final_layernorm = RMSNorm(H, eps)
                self.layers.append(block)
        base = len(config.pattern)
        self.modules_ = [MTPModule(list(self.layers[m * n : (m + 1) * n]), base + m * n)
                         for m in range(config.num_nextn_predict_layers)]

    @property
    def num_modules(self) -> int:
        return len(self.modules_)

    def depth(self, k: int) -> MTPModule:
        """The module that runs depth k (1-based): weights repeat when k exceeds the checkpoint's modules."""
        return self.modules_[(k - 1) % len(self.modules_)]

    @torch.no_grad()
    def init_weights(self, config: ModelConfig) -> None:
        for block in self.layers:
            block.init_weights(config, config.num_hidden_layers)
            for name in ("enorm", "hnorm", "final_layernorm"):
                if hasattr(block, name):
                    getattr(block, name).weight.fill_(1.0)
            if hasattr(block, "eh_proj"):
                nn.init.normal_(block.eh_proj.weight, std=config.initializer_range)
