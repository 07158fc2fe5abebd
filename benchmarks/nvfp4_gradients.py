"""How far the NVFP4 recipe's gradient is from the fp32 gradient, against how far two batches are apart.

    .venv/bin/python benchmarks/nvfp4_gradients.py runs/nvfp4_recipe/fp32-seed1/final
    .venv/bin/python benchmarks/nvfp4_gradients.py CKPT --batches 4 --batch-size 16

A quantized training run can fall behind for two different reasons, and they call for different fixes:

* the *gradient* is a poor estimate of the fp32 gradient (rounding of the dgrad/wgrad operands: what
  stochastic rounding and the Hadamard transform are for), or
* the *forward* is a different function (the network the optimizer sees is the rounded one, so its
  gradient points somewhere else even if computed exactly).

For one checkpoint and the same batch this prints, per weight matrix, the cosine between the fp32
gradient and the gradient of the NVFP4-converted model (the full recipe, and without SR, without RHT),
next to the cosine between the fp32 gradients of two *different* batches: the optimizer's own noise.
If the recipe's cosine is far above the batch-to-batch one, gradient rounding adds little to the noise
SGD already lives with. If the variants without SR / RHT barely move the cosine, the remaining
difference comes from the forward, not from rounding the backward. Every cosine is averaged over
`--batches` batches of task rows (fresh training-distribution draws), the checkpoint's own tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from nemotron3 import load_pretrained
from nemotron3.quant.convert import PrecisionPolicy, convert_to_nvfp4, module_precision
from nemotron3.quant.nvfp4_linear import NVFP4Recipe
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train.loss import token_ce_sum

RECIPES = {"recipe": {}, "no-sr": {"stochastic_rounding": False}, "no-rht": {"rht": False},
           "no-2d": {"weight_2d": False}}


def gradients(model: torch.nn.Module, batch: train_data.Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean masked cross-entropy of `batch` and the gradient of every weight matrix."""
    model.zero_grad(set_to_none=True)
    loss = token_ce_sum(model(batch.inputs), batch.targets, batch.mask) / batch.mask.sum()
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                         if p.grad is not None and p.dim() >= 2 and n.startswith("backbone.layers.")}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def precision(model: torch.nn.Module, param: str) -> str:
    """The format the GEMM owning `param` runs in after conversion (conv and router weights: 'high')."""
    return module_precision(model.get_submodule(param.rsplit(".", 1)[0])) or "high"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a checkpoint folder (e.g. a pretrain run's final/)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="task seed and the recipe's SR seed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"error: {args.checkpoint} is not a checkpoint folder (no config.json); "
                         "pass a run's final/ or step-NNNNNN/")
    tokenizer = Tokenizer.load(args.checkpoint)
    texts = train_data.task_texts(20 * args.batches * args.batch_size, args.seed + 1000, "train", 1)
    part = train_data.build(tokenizer, texts, 256, args.seed)
    rows = train_data.PackedData(part.rows, part.mask, args.seed)
    if len(rows) < 2 * args.batches * args.batch_size:
        raise SystemExit(f"error: only {len(rows)} task rows for {args.batches} x 2 batches of {args.batch_size}")
    base = load_pretrained(args.checkpoint, dtype=torch.float32)
    models = {}
    for name, off in RECIPES.items():
        models[name] = copy.deepcopy(base)
        convert_to_nvfp4(models[name], PrecisionPolicy(recipe=NVFP4Recipe(seed=args.seed, **off)))

    cos: dict[tuple[str, str], list[float]] = {}
    losses: dict[str, list[float]] = {}
    for i in range(args.batches):
        a = rows.take(list(range(2 * i * args.batch_size, (2 * i + 1) * args.batch_size)))
        b = rows.take(list(range((2 * i + 1) * args.batch_size, (2 * i + 2) * args.batch_size)))
        loss_a, g_a = gradients(base, a)
        _, g_b = gradients(base, b)
        losses.setdefault("fp32", []).append(loss_a)
        for n in g_a:
            cos.setdefault((n, "other batch"), []).append(cosine(g_a[n], g_b[n]))
        for name, model in models.items():
            loss_q, g_q = gradients(model, a)
            losses.setdefault(name, []).append(loss_q)
            for n in g_a:
                cos.setdefault((n, name), []).append(cosine(g_a[n], g_q[n]))

    print(f"{args.checkpoint}: loss on the same batches, " +
          ", ".join(f"{k} {statistics.mean(v):.4f}" for k, v in losses.items()))
    cols = ["other batch", *RECIPES]
    names = sorted({n for n, _ in cos}, key=lambda n: (int(n.split(".")[2]), n))
    print(f"\ncosine with the fp32 gradient of the same batch (mean of {args.batches})\n")
    print(f"| weight | runs in | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}")
    for n in names:
        print(f"| {n.removeprefix('backbone.layers.')} | {precision(models['recipe'], n)} | "
              + " | ".join(f"{statistics.mean(cos[n, c]):.3f}" for c in cols) + " |")
    means = {c: statistics.mean(statistics.mean(cos[n, c]) for n in names) for c in cols}
    print("| **mean** | | " + " | ".join(f"**{means[c]:.3f}**" for c in cols) + " |")


if __name__ == "__main__":
    main()
