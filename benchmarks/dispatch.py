"""Bytes moved per token by expert-parallel dispatch + combine: standard MoE against LatentMoE.

    .venv/bin/python benchmarks/dispatch.py              # computed for Super, then measured on tiny with 2 ranks
    .venv/bin/python benchmarks/dispatch.py --no-measure

**Computed** (`expert_parallel.dispatch_bytes_per_token`) for the Super preset's shapes: each token's top_k
routed copies, of which (ep-1)/ep live on another rank when routing spreads evenly, each move the expert width
one way for dispatch and back for combine, in bf16: `hidden_size` for standard MoE, `moe_latent_size` for
LatentMoE (whose down-projection runs before dispatch). Per MoE layer and per token over all MoE layers.

**Measured** on the tiny preset with 2 gloo ranks (re-launched under torchrun): one MoE layer, once with its
latent projections (LatentMoE, width 64) and once without (standard, width 128), with the same router so the
same copies go to the same experts; `DispatchStats` counts what each rank actually handed the two
all-to-alls for the other rank. Printed next to the same count recomputed from the routing, and next to the
even-spread formula (which real routing only approaches).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import torch

from nemotron3.config import ModelConfig
from nemotron3.distributed.expert_parallel import dispatch_bytes_per_token


def computed(name: str = "super-120b-a12b") -> None:
    c = ModelConfig.load(name)
    layers = c.pattern.count("E") + (c.mtp_pattern.count("E") * c.num_nextn_predict_layers if c.mtp_pattern else 0)
    print(f"computed, {name}: hidden {c.hidden_size}, latent {c.moe_latent_size}, top_k {c.num_experts_per_tok} of "
          f"{c.n_routed_experts}, {layers} MoE layers, bf16\n")
    print("| ep | standard B/token/layer | LatentMoE B/token/layer | ratio | standard MB/token (all layers) | "
          "LatentMoE MB/token |")
    print("|---|---|---|---|---|---|")
    for ep in (2, 8, 16, 64):
        b = dispatch_bytes_per_token(c.hidden_size, c.moe_latent_size, c.num_experts_per_tok, ep)
        print(f"| {ep} | {b['standard']:,.0f} | {b['latent']:,.0f} | {b['ratio']:.1f} | "
              f"{b['standard'] * layers / 1e6:.2f} | {b['latent'] * layers / 1e6:.2f} |")


def worker(tokens: int) -> None:
    """Under torchrun: one tiny MoE layer, latent and standard, same routing; prints rank 0's counts as JSON."""
    import torch.distributed as dist

    from nemotron3.distributed import parallel
    from nemotron3.distributed.expert_parallel import shard_experts
    from nemotron3.model.moe import MoE

    with parallel.process_group() as rank:
        config = ModelConfig.load("tiny")
        out = {}
        gate = None
        for kind, cfg in (("latent", config), ("standard", config.replace(moe_latent_size=None))):
            torch.manual_seed(0)
            moe = MoE(cfg)
            moe.init_weights(cfg, 4)
            if gate is not None:
                moe.gate.load_state_dict(gate)
            gate = copy.deepcopy(moe.gate.state_dict())
            (experts,) = shard_experts(moe)
            torch.manual_seed(1 + rank)
            x = torch.randn(1, tokens, cfg.hidden_size)
            with torch.no_grad():
                moe(x)
                _, idx, _ = moe.gate(x[0])
            owners = [torch.empty_like(idx) for _ in range(2)]
            dist.all_gather(owners, idx // experts.local)
            width = cfg.moe_expert_dim * 4  # fp32 on CPU
            sent = int((owners[rank] != rank).sum()) * width
            back = sum(int((o == rank).sum()) for r, o in enumerate(owners) if r != rank) * width
            formula = dispatch_bytes_per_token(cfg.hidden_size, cfg.moe_latent_size, cfg.num_experts_per_tok, 2, 4)
            out[kind] = {"measured": (experts.stats.dispatch_bytes + experts.stats.combine_bytes) / tokens,
                         "from_routing": (sent + back) / tokens,
                         "formula": formula["latent" if kind == "latent" else "standard"]}
        if rank == 0:
            print(json.dumps(out))


def measured(tokens: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, "--worker", "--tokens", str(tokens)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nmeasured, tiny (hidden 128, latent 64, top_k 4 of 16), 2 gloo ranks, {tokens} tokens per rank, fp32, "
          "rank 0, one MoE layer\n")
    print("| dispatch | measured B/token | recounted from the routing | even-spread formula |")
    print("|---|---|---|---|")
    for kind in ("standard", "latent"):
        m = r[kind]
        print(f"| {kind} | {m['measured']:.1f} | {m['from_routing']:.1f} | {m['formula']:.1f} |")
    print(f"\nstandard / latent, measured: {r['standard']['measured'] / r['latent']['measured']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-measure", action="store_true", help="only the computed table")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank in the measurement")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.tokens)
    computed()
    if not args.no_measure:
        measured(args.tokens)


if __name__ == "__main__":
    main()
