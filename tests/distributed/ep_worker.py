"""Run under torchrun by tests/distributed/test_expert_parallel.py: one MoE layer of the tiny config, whole on
every rank (the reference) and expert-parallel over the ranks (distributed/expert_parallel.py), on each rank's tokens;
writes `ep-RANK.json` with the largest differences and the bytes counted against the bytes expected from the
routing.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/ep_worker.py OUT
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nemotron3.config import ModelConfig
from nemotron3.distributed import parallel
from nemotron3.distributed.expert_parallel import shard_experts
from nemotron3.model.moe import MoE


def run(config: ModelConfig, rank: int, world: int, gate: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """`gate`: the router's weight and bias to use (so that two configs route the same tokens alike)."""
    torch.manual_seed(0)
    ref = MoE(config)
    ref.init_weights(config, 4)
    with torch.no_grad():
        ref.gate.e_score_correction_bias.normal_(0, 0.1)  # an uneven load: some experts get many rows, some none
        if gate is not None:
            ref.gate.weight.copy_(gate[0])
            ref.gate.e_score_correction_bias.copy_(gate[1])
    ep = copy.deepcopy(ref)
    (experts,) = shard_experts(ep)
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(3, 8, config.hidden_size, requires_grad=True)
    g = torch.randn(3, 8, config.hidden_size)
    y_ref = ref(x)
    (y_ref * g).sum().backward()
    x_grad_ref, x.grad = x.grad, None
    y = ep(x)
    (y * g).sum().backward()
    full_grads = {n: p.grad.clone() for n, p in ref.experts.named_parameters()}
    for t in full_grads.values():
        dist.all_reduce(t)  # an expert's gradient sums over every rank's tokens
    lo, n = experts.first, experts.local
    _, idx, _ = ref.gate(x.detach().reshape(-1, config.hidden_size))
    owner = idx.reshape(-1) // n
    width, elt = config.moe_expert_dim, 4
    sent = int((owner != rank).sum())
    owners = [torch.empty_like(owner) for _ in range(world)]
    dist.all_gather(owners, owner)
    received = sum(int((o == rank).sum()) for r, o in enumerate(owners) if r != rank)
    return {
        "y": float((y - y_ref).abs().max()), "x_grad": float((x.grad - x_grad_ref).abs().max()),
        "up_grad": float((experts.up_proj.grad - full_grads["up_proj"][lo: lo + n]).abs().max()),
        "down_grad": float((experts.down_proj.grad - full_grads["down_proj"][lo: lo + n]).abs().max()),
        "dispatch_bytes": experts.stats.dispatch_bytes, "combine_bytes": experts.stats.combine_bytes,
        "expected_dispatch": sent * width * elt, "expected_combine": received * width * elt,
        "idle_experts": int((torch.bincount(idx.reshape(-1), minlength=config.n_routed_experts) == 0).sum()),
        "tokens": experts.stats.tokens, "routed": idx.tolist(),
        "gate": (ref.gate.weight.detach(), ref.gate.e_score_correction_bias.clone()),
    }


def main(out: Path) -> None:
    with parallel.process_group() as rank:
        world = parallel.rank_world()[1]
        latent_cfg = ModelConfig.load("tiny")
        latent = run(latent_cfg, rank, world, None)
        standard = run(latent_cfg.replace(moe_latent_size=None), rank, world, latent["gate"])
        same = latent.pop("routed") == standard.pop("routed")
        result = {name: {k: v for k, v in r.items() if k != "gate"} for name, r in
                  (("latent", latent), ("standard", standard))}
        result["same_routing"] = same
        result["hidden"], result["latent_size"] = latent_cfg.hidden_size, latent_cfg.moe_latent_size
        (out / f"ep-{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
