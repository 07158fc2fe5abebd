"""Grouped-query causal self-attention of a `*` layer (docs/architecture.md §3).

No positional embedding of any kind: Nemotron 3 gets position from its Mamba layers, and the configs'
`rope_theta` is unused (transformers, vLLM and Megatron-Bridge all agree). No biases, scale 1/√head_dim.

With a cache (`forward(x, cache)`), the new keys and values go into the row's slots at its current length,
and the queries attend to everything the row holds. Query i of row b sits at position start[b] + i and
sees keys j ≤ start[b] + i; keys of padding tokens (right padding, positions past the row's real tokens)
are written but only later padding queries can see them, and the row's length never covers them.
Because the position-dependent mask has to be explicit, the scores would be (queries × keys) per head:
a 64k-token prompt would need gigabytes, so queries go through in blocks sized to keep the scores of
one block under `SCORE_BUDGET` elements, whatever the prompt length.

`AttentionStep` is the same layer for the fast decoder (engine/decode.py): q|k|v as one matrix, t new
tokens of every cache row, the mask built once per step by the decoder for all attention layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.packing import Packer, addmm, mm, pack_weight
from nemotron3.model.state import StateSpec

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

    @staticmethod
    def state_spec(config: ModelConfig, max_len: int) -> dict[str, StateSpec]:
        """Per row: the keys and values of every position, (kv_heads, max_len, head_dim) each."""
        shape = (config.num_key_value_heads, max_len, config.head_dim)
        return {"key": StateSpec(shape, kind="sequence"), "value": StateSpec(shape, kind="sequence")}

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden (b, t, H) -> (b, t, H): causal over the sequence, or attending to `cache`'s rows too."""
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, hq, t, d)
        k = self.k_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim)  # (b, t, hk, d)
        v = self.v_proj(hidden).view(b, t, self.num_kv_heads, self.head_dim)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=self.scale, enable_gqa=True)
        else:
            y = self._attend_cached(q, cache.append("key", k).to(q.dtype), cache.append("value", v).to(q.dtype),
                                    cache.positions)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _attend_cached(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
        """q (b, hq, t, d), keys/values (b, hk, L, d), pos (b, t) -> (b, hq, t, d); query i sees keys <= pos."""
        b, _, t, _ = q.shape
        n_keys = keys.shape[2]
        key_pos = torch.arange(n_keys, device=q.device)
        block = max(1, SCORE_BUDGET // max(1, b * self.num_heads * n_keys))
        out = []
        for i in range(0, t, block):
            mask = key_pos <= pos[:, i : i + block, None]  # (b, tq, L)
            out.append(F.scaled_dot_product_attention(
                q[:, :, i : i + block], keys, values, attn_mask=mask[:, None], scale=self.scale, enable_gqa=True))
        return torch.cat(out, dim=2) if len(out) > 1 else out[0]  # (b, hq, t, d)


class AttentionStep:
    """The fused attention layer of the fast decoder: `step(h, x, cache)` for t new tokens of every row.

    h (B·t, H) residual, x = RMSNorm(h); returns h + attention(x). Keys are read up to `cache.n_keys`
    under `cache.mask` (None: every row at the same length, one token, no mask needed).
    """

    def __init__(self, mixer: Attention, pack: Packer | None = None) -> None:
        m = mixer
        self.hq, self.hk, self.d = m.num_heads, m.num_kv_heads, m.head_dim
        self.w_qkv_t = pack_weight(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]), pack)  # H -> ·
        self.w_o_t = pack_weight(m.o_proj.weight, pack)  # hq·d -> H
        # bf16 on a CPU: torch's bf16 SDPA kernel is several times slower at decode than two bf16 bmm's with the
        # softmax in fp32 between them (measured, docs/inference.md §6)
        w = m.q_proj.weight
        self.bmm = w.dtype == torch.bfloat16 and w.device.type == "cpu"

    def __call__(self, h: torch.Tensor, x: torch.Tensor, cache) -> torch.Tensor:
        hq, hk, d, t = self.hq, self.hk, self.d, cache.t
        B = h.shape[0] // t
        qkv = mm(x, self.w_qkv_t).view(B, t, (hq + 2 * hk) * d)
        q = qkv[..., : hq * d].view(B, t, hq, d).transpose(1, 2)  # (B, hq, t, d)
        k = qkv[..., hq * d : (hq + hk) * d].view(B, t, hk, d)
        v = qkv[..., (hq + hk) * d :].view(B, t, hk, d)
        keys, values = cache.append("key", k), cache.append("value", v)  # (B, hk, n, d)
        if self.bmm:  # query head h reads kv head h // (hq / hk): group the queries by kv head
            r = hq // hk
            s = torch.matmul(q.reshape(B, hk, r * t, d), keys.transpose(-1, -2)).float().mul_(d**-0.5)
            if cache.mask is not None:  # (B, 1, t, n) -> (B, 1, 1, t, n) over the r heads of a group
                s = s.view(B, hk, r, t, -1).masked_fill_(~cache.mask[:, :, None], float("-inf")).view(B, hk, r * t, -1)
            y = torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), values).view(B, hq, t, d)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=cache.mask, scale=d**-0.5,
                                               enable_gqa=hq != hk)  # (B, hq, t, d)
        return addmm(h, y.transpose(1, 2).reshape(B * t, hq * d), self.w_o_t)
