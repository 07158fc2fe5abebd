"""Claim: LatentMoE gives better accuracy per FLOP and per parameter than a standard MoE (white paper §2.2,
LatentMoE paper arXiv:2601.18089; the white paper's 8B-active ablation: +4.6 MMLU-Pro at equal cost).

    .venv/bin/python benchmarks/claims/latent_moe.py --quick          # ~3-5 minutes on 2 shared cores
    .venv/bin/python benchmarks/claims/latent_moe.py                  # full: 5 seeds (see --help for the sizes)

How the variants are built. LatentMoE projects the token from the hidden size d to a latent size ℓ = d/α before
the routed experts and back after them; the router, the shared expert and every other layer stay at width d. The
LatentMoE paper and the white paper spend the factor α saved per expert on more experts and a larger top-k,
N' = α·N and K' = α·K, keeping the expert FFN width (Super: α = 4, 128 → 512 experts, top-6 → top-22, where
the rule would give 24). Under that rule the routed experts' total *and* active weights are unchanged
(α·N experts of 2·ℓ·I weights against N of 2·d·I; the same for K), so the two comparisons the issue asks for
differ only in who pays for the overhead LatentMoE adds per layer: the two latent projections (2·d·ℓ) and the
wider router (d·(α-1)·N). Here, from the tiny hybrid (`MEM*EME`, d = 128, no MTP block), α = 2 (ℓ = 64, the
tiny preset's latent size):

    moe            standard MoE: 16 experts, top-4, expert FFN 128 (the baseline)
    latent-flops   (a) matched active parameters / FLOPs per token: 32 experts, top-8 (α·N, α·K), the expert FFN
                   width solved so that the active parameters per token equal the baseline's (the overhead is
                   paid from the expert width, 128 -> ~110)
    latent-params  (b) matched total parameters: top-8 (α·K), expert FFN 128, the number of experts solved so
                   that the total parameters equal the baseline's (32 -> ~31; its active count is then the
                   baseline's plus the overhead)

`--alpha 4` runs Super's ratio instead (ℓ = 32, 64 experts, top-16). Every variant is a `ModelConfig` trained by
the ordinary `nemotron3 pretrain` stage (same loop, data and schedule; within a seed the same data order), so
the differences are paired by seed.

Measured per variant: held-out loss (main head, nats) and greedy exact match per task family after the same
tokens; counted: parameters (total, active), forward FLOPs per token (common.flops_per_token, at the mean
training context), and expert-parallel dispatch + combine bytes per token (bf16, ep = 2, the experts split into
two contiguous halves as expert_parallel.py places them, the held-out rows split in halves between the ranks:
counted from the trained model's actual routing, the same count `DispatchStats` returns, benchmarks/dispatch.py);
timed: decode tok/s at batch 1 (greedy, 64 new tokens, best of 3 interleaved; the machine is shared, so this is
noisy and only ratios in the same run mean anything).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PAPER_SIGN = -1  # LatentMoE lowers the loss


def _solve(gap, start: int) -> int:
    """The integer x >= 1 nearest to gap(x) = 0 for a gap linear in x (a parameter count minus its target)."""
    g0, g1 = gap(start), gap(start + 1)
    x = max(1, round(start - g0 / (g1 - g0))) if g1 != g0 else start
    return min((c for c in (x - 1, x, x + 1) if c >= 1), key=lambda c: abs(gap(c)))


def variants(alpha: int = 2) -> dict:
    """The three ModelConfigs (see the module docstring), keyed by name."""
    from nemotron3.config import ModelConfig

    base = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0, moe_latent_size=None,
                                              n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128)
    d = base.hidden_size
    if d % alpha:
        raise ValueError(f"--alpha {alpha} does not divide the hidden size {d}")
    latent = base.replace(moe_latent_size=d // alpha, n_routed_experts=alpha * base.n_routed_experts,
                          num_experts_per_tok=alpha * base.num_experts_per_tok)
    ref = common.params(base)
    width = _solve(lambda i: common.params(latent.replace(moe_intermediate_size=i))["active"] - ref["active"],
                   base.moe_intermediate_size)
    experts = _solve(lambda n: common.params(latent.replace(n_routed_experts=n))["total"] - ref["total"],
                     latent.n_routed_experts)
    return {"moe": base, "latent-flops": latent.replace(moe_intermediate_size=width),
            "latent-params": latent.replace(n_routed_experts=experts)}


def dispatch_bytes(model, rows) -> float:
    """bf16 bytes per token that ep = 2 dispatch + combine would move, counted from the routing of `rows`
    (rows[:half] on rank 0, the rest on rank 1; experts in two contiguous halves), summed over MoE layers."""
    import torch

    from nemotron3.model.moe import MoE

    picks = []
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: picks.append(out[1].detach()))
             for m in model.modules() if isinstance(m, MoE)]
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    try:
        with torch.no_grad():
            model(rows)
    finally:
        for h in hooks:
            h.remove()
    tokens = rows.numel()
    rank = (torch.arange(tokens) >= (rows.shape[0] // 2) * rows.shape[1]).long()  # token -> its rank
    total = 0.0
    for idx, moe in zip(picks, moes):
        local = moe.experts.num_experts // 2
        off = int(((idx // local) != rank[:, None]).sum())
        width = model.config.moe_latent_size or model.config.hidden_size
        total += off * width * 2 * 2  # dispatch and combine, bf16
    return total / tokens


def decode_speed(models: dict, tokenizer, new: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` decode tok/s of each model at batch 1, timed alternately."""
    from nemotron3 import Engine

    prompt = [[tokenizer.bos_id, *tokenizer.encode("add: 12 + 34\n")]]
    engines = {n: Engine(m, max_seq_len=256) for n, m in models.items()}
    best = dict.fromkeys(models, 0.0)
    for e in engines.values():
        e.generate(prompt, 4, stop_token_ids=[])
    for _ in range(repeats):
        for n, e in engines.items():
            out = e.generate(prompt, new, stop_token_ids=[])
            best[n] = max(best[n], out.stats["decode_tok_s"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds x 25 steps of 8 x 128 tokens (a smoke test)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-problems", type=int, default=10, help="held-out problems per family for exact match")
    ap.add_argument("--alpha", type=int, default=2, help="d / latent size (2: ℓ = 64; Super: 4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=common.ROOT / "runs/claims/latent_moe")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT/latent_moe.png)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs from --out instead of retraining")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.seq_len, args.eval_problems = 2, 25, 8, 128, 2
    common.set_threads(args.threads)
    import torch

    from nemotron3 import load_pretrained
    from nemotron3.tokenizer import Tokenizer
    from nemotron3.train import data as train_data

    configs = variants(args.alpha)
    names = list(configs)
    t0 = time.perf_counter()
    res: dict[str, list[dict]] = {n: [] for n in names}
    for seed in range(args.seeds):
        tok = None  # the seed's first run trains the tokenizer, its other variants load it
        for n in names:
            s = common.pretrain_run(configs[n], args.out / f"{n}-seed{seed}", seed, args.steps, args.batch_size,
                                    args.seq_len, args.eval_problems, args.reuse, tok, mtp_depths=0)
            res[n].append(s)
            tok = tok or args.out / f"{n}-seed{seed}" / "final"
            common.say(f"{n} seed {seed}: held-out {s['eval_losses'][-1][1]:.4f}, {s['train_seconds']:.0f} s")
    # counted costs, on the trained seed-0 models (the vocabulary is the tokenizer's)
    models = {n: load_pretrained(args.out / f"{n}-seed0" / "final", dtype=torch.float32) for n in names}
    tok = Tokenizer.load(args.out / f"{names[0]}-seed0" / "final")
    held = train_data.build(tok, train_data.task_texts(64, 0, "heldout", 1), args.seq_len, 0).rows[:8, :-1]
    cost = {}
    for n, m in models.items():
        p = common.params(m.config)
        cost[n] = {"total": p["total"], "active": p["active"],
                   "flops": common.flops_per_token(m.config, args.seq_len // 2),
                   "bytes": dispatch_bytes(m.eval(), held)}
    speed = decode_speed(models, tok, 64 if not args.quick else 16, 3)

    heldout = {n: [s["eval_losses"][-1][1] for s in res[n]] for n in names}
    fams = sorted(res[names[0]][0]["accuracy"])
    em = {n: [100 * sum(s["accuracy"].values()) / max(1, len(fams)) for s in res[n]] for n in names}
    lines = [f"LatentMoE vs MoE: tiny hybrid MEM*EME, α = {args.alpha}, {args.seeds} seeds, {args.steps} steps x "
             f"{args.batch_size} x {args.seq_len} tokens, {args.eval_problems} held-out problems per family; "
             f"{common.machine()}; {time.perf_counter() - t0:.0f} s", "",
             "| variant | experts / top-k / FFN / latent | total params | active params | FLOPs/token | "
             "dispatch B/token (ep 2, bf16) | decode tok/s (b=1, noisy) | held-out loss | mean EM % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        c, k = configs[n], cost[n]
        lines.append(f"| {n} | {c.n_routed_experts} / {c.num_experts_per_tok} / {c.moe_intermediate_size} / "
                     f"{c.moe_latent_size or '-'} | {k['total']:,} | {k['active']:,} | {k['flops']:,} | "
                     f"{k['bytes']:,.0f} | {speed[n]:,.0f} | {common.fmt(heldout[n], 4)} | {common.fmt(em[n], 1)} |")
    lines += ["", "| family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(common.fmt([100 * s["accuracy"][f] for s in res[n]], 1)
                                             for n in names) + " |")
    lines += ["", "Paired against `moe` (same seed), held-out loss (the paper: LatentMoE lower):"]
    verdicts = {}
    for n in names[1:]:
        t = common.paired_test(heldout[n], heldout["moe"])
        verdicts[n] = common.verdict(t, PAPER_SIGN)
        te = common.paired_test(em[n], em["moe"])
        lines.append(f"  {n}: loss {common.test_text(t)} -> {verdicts[n]}; mean EM {common.test_text(te, 1)} points")
        ratio = cost["moe"]["bytes"] / cost[n]["bytes"]
        lines.append(f"  {n}: counted vs moe: total {cost[n]['total'] / cost['moe']['total'] - 1:+.1%}, active "
                     f"{cost[n]['active'] / cost['moe']['active'] - 1:+.1%}, FLOPs/token "
                     f"{cost[n]['flops'] / cost['moe']['flops'] - 1:+.1%}, dispatch bytes moe/{n} = {ratio:.2f}")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latent_moe.md").write_text("\n".join(lines) + "\n")

    fig, axes = common.figure(3)
    common.bars(axes[0], names, heldout, "held-out loss (nats)", "held-out loss, lower is better")
    common.bars(axes[1], names, em, "mean exact match (%)", "held-out exact match", from_zero=True)
    keys = [("total", "total params"), ("active", "active params"), ("flops", "FLOPs/token"),
            ("bytes", "dispatch bytes")]
    common.relative_bars(axes[2], names, cost, keys, "moe", "counted costs (moe = 1)")
    common.save(fig, args.plot or args.out / "latent_moe.png",
                f"LatentMoE (α={args.alpha}) vs MoE, tiny hybrid, {args.seeds} seeds x {args.steps} steps; "
                f"mean ± s.e., dots = seeds")


if __name__ == "__main__":
    main()
