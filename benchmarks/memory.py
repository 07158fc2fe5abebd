"""Memory per GPU of FSDP2 training (nemotron3/distributed/parallel.py) for a preset, computed from its config.

    .venv/bin/python benchmarks/memory.py                      # Nano and Super at a few (dp_shard, ep) layouts
    .venv/bin/python benchmarks/memory.py --seq-len 8192 --rows 1

Nothing is trained or allocated: the parameter counts come from the model built on the meta device (every
parameter, and the routed experts' share of it, by module), the rest is arithmetic on the config.

Per GPU, with P parameters sharded over `dp_shard` ranks:

    states      16 B · P / dp_shard       fp32 master weights 4 B + fp32 gradients 4 B + AdamW moments 8 B
    gathered    2 · 2 B · (largest unit)  a block's parameters all-gathered in bf16, two units live at once
                                          (the one computing and the one prefetched); with expert
                                          parallelism a rank gathers only its 1/ep of a block's experts
    activations A B/token · tokens        bf16 tensors saved for backward, no activation checkpointing

A (bytes per token) is an estimate from the layer shapes, not a measurement: per layer, the widths of the
tensors autograd keeps, in bf16. Norm: its input (H). Mamba-2: in_proj's output (2·d_inner + 2·G·N + heads),
the conv's output (d_inner + 2·G·N), the SSD output and the gated norm's input and output (3·d_inner).
Attention: q, k, v and the output (2·heads·head_dim + 2·kv_heads·head_dim). MoE: the router's input and
scores (H + E), the shared expert (H + 2·I_shared), and per routed copy (top_k of them) the expert input and its
up-projection before and after the activation (D + 2·I), with D the latent width under LatentMoE, which adds the
latent projections' inputs (H + D). Logits are not counted (they are computed in chunks or freed at once). The
MTP block's layers count like any other layer.
"""

from __future__ import annotations

import argparse

import torch

from nemotron3.config import ModelConfig
from nemotron3.model import HybridLM

GiB = 1024**3


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """total, routed experts, and the largest single block's dense and routed-expert parameters."""
    with torch.device("meta"):
        model = HybridLM(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    blocks = [*model.backbone.layers, *(model.mtp.layers if model.mtp is not None else [])]
    per_block = [(sum(p.numel() for n, p in b.named_parameters() if ".experts." not in n),
                  sum(p.numel() for n, p in b.named_parameters() if ".experts." in n)) for b in blocks]
    dense, routed = max(per_block, key=sum)
    return {"total": model.num_parameters(), "experts": experts, "block_dense": dense, "block_experts": routed}


def activation_bytes_per_token(config: ModelConfig) -> int:
    """The estimate A of the module docstring, bf16."""
    H = config.hidden_size
    d_in, gn = config.mamba_intermediate_size, config.n_groups * config.ssm_state_size
    widths = {
        "M": H + (2 * d_in + 2 * gn + config.mamba_num_heads) + (d_in + 2 * gn) + 3 * d_in,
        "*": H + 2 * config.num_attention_heads * config.head_dim + 2 * config.num_key_value_heads * config.head_dim,
        "-": H + H + 2 * config.intermediate_size,
    }
    if config.n_routed_experts:
        D = config.moe_expert_dim
        latent = H + D if config.moe_latent_size is not None else 0
        widths["E"] = (H + H + config.n_routed_experts + H + 2 * config.moe_shared_expert_intermediate_size
                       + config.num_experts_per_tok * (D + 2 * config.moe_intermediate_size) + latent)
    kinds = config.pattern + (config.mtp_pattern * config.num_nextn_predict_layers if config.mtp_pattern else "")
    return 2 * sum(widths[k] for k in kinds)


def memory_per_gpu(config: ModelConfig, dp_shard: int, ep: int, tokens: int) -> dict[str, float]:
    """GiB per GPU: sharded states, gathered units, activations for `tokens` tokens per GPU, and their sum."""
    c = parameter_counts(config)
    states = 16 * c["total"] / dp_shard
    gathered = 2 * 2 * (c["block_dense"] + c["block_experts"] / ep)
    act = activation_bytes_per_token(config) * tokens
    out = {"states": states / GiB, "gathered": gathered / GiB, "activations": act / GiB}
    out["total"] = sum(out.values())
    return out


LAYOUTS = {"nano-30b-a3b": [(8, 1), (8, 8), (16, 8), (64, 8)],
           "super-120b-a12b": [(8, 1), (16, 8), (64, 8), (128, 16), (512, 64)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=1, help="rows per GPU per micro-batch")
    args = ap.parse_args()
    tokens = args.seq_len * args.rows
    print(f"tokens per GPU per micro-batch: {tokens} ({args.rows} x {args.seq_len})\n")
    print("| preset | params (experts) | activations / token | dp_shard | ep | states | gathered | activations "
          "| total GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layouts in LAYOUTS.items():
        config = ModelConfig.load(name)
        c = parameter_counts(config)
        a = activation_bytes_per_token(config)
        for dp, ep in layouts:
            m = memory_per_gpu(config, dp, ep, tokens)
            print(f"| {name} | {c['total'] / 1e9:.1f}B ({c['experts'] / 1e9:.1f}B) | {a / 1024:.0f} KiB | {dp} | {ep} "
                  f"| {m['states']:.1f} | {m['gathered']:.2f} | {m['activations']:.1f} | {m['total']:.1f} |")


if __name__ == "__main__":
    main()
