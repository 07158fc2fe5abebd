"""Grouped-query causal self-attention of a `*` layer (ARCHITECTURE.md §3).

No positional embedding of any kind: Nemotron 3 gets position from its Mamba layers, and the configs'
`rope_theta` is unused (transformers, vLLM and Megatron-Bridge all agree). No biases, scale 1/√head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig


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
