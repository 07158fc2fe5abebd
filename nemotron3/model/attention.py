"""Grouped-query causal self-attention of a `*` layer (docs/architecture.md §3).

No positional embedding of any kind: Nemotron 3 gets position from its Mamba layers, and the configs'
`rope_theta` is unused (transformers, vLLM and Megatron-Bridge all agree). No biases, scale 1/√head_dim.

With a cache (`forward_cached`), the new keys and values go into the row's slots at its current length,
and the queries attend to everything the row holds. Query i of row b sits at position start[b] + i and
sees keys j ≤ start[b] + i; keys of padding tokens (right padding, positions past the row's real tokens)
are written but only later padding queries can see them, and the row's length never covers them.
Because the position-dependent mask has to be explicit, the scores would be (queries × keys) per head:
a 64k-token prompt would need gigabytes, so queries go through in blocks sized to keep the scores of
one block under `SCORE_BUDGET` elements, whatever the prompt length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig

SCORE_BUDGET = 1 << 24  # attention scores materialised at once by forward_cached (64 MB in fp32)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=False)

    @torch.no_grad()
    def init_weights(self, config: ModelConfig, n_layers: int) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=config.initializer_range)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (b, t, H) -> (b, t, H), causal over the whole sequence."""
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, hq, t, d)
        k = self.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, hk, t, d)
        v = self.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward_cached(self, hidden: torch.Tensor, view, layer: int) -> torch.Tensor:
        """hidden (b, t, H) of the new tokens -> (b, t, H), attending to the row's cached keys too.

        `view` is a `CacheView` (engine/cache.py); `layer` the index of this layer's slots in the cache.
        """
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, hq, t, d)
        k = self.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim)  # (b, t, hk, d)
        v = self.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim)
        K, V = view.cache.key[layer], view.cache.value[layer]  # (rows, hk, T_max, d)
        pos = view.positions  # (b, t)
        K[view.index[:, None], :, pos] = k.to(K.dtype)  # advanced indices first: (b, t, hk, d)
        V[view.index[:, None], :, pos] = v.to(V.dtype)
        n_keys = int(pos.max()) + 1
        if view.rows is None:  # every row in order: views, no copy
            keys, values = K[:, :, :n_keys].to(q.dtype), V[:, :, :n_keys].to(q.dtype)  # (b, hk, L, d)
        else:
            keys, values = K[view.index, :, :n_keys].to(q.dtype), V[view.index, :, :n_keys].to(q.dtype)
        key_pos = torch.arange(n_keys, device=hidden.device)
        block = max(1, SCORE_BUDGET // max(1, b * self.num_heads * n_keys))
        out = []
        for i in range(0, t, block):
            mask = key_pos <= pos[:, i : i + block, None]  # (b, tq, L)
            out.append(F.scaled_dot_product_attention(
                q[:, :, i : i + block], keys, values, attn_mask=mask[:, None], scale=self.scale, enable_gqa=True))
        y = torch.cat(out, dim=2) if len(out) > 1 else out[0]  # (b, hq, t, d)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
