"""What each quantized format costs in accuracy and bytes, on one trained checkpoint, in one table.

    .venv/bin/python benchmarks/quantize.py --model runs/sft/final --problems 10 --json /tmp/quantize.json

For fp32, bf16 and every `nemotron3 quantize` scheme (nvfp4 and fp8 with their activations emulated): the held-out
loss (mean next-token cross-entropy over held-out task documents), greedy exact match per task family
(nemotron3.evaluate.task_accuracy on the held-out split), the checkpoint's bytes on disk, and the weights'
quantization error: relative RMSE ‖W_q − W‖ / ‖W‖ over all the quantized GEMM weights (the same matrices for every
format; those kept high are excluded). SeedLM's exhaustive seed search dominates the run time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from nemotron3 import load_pretrained, save_pretrained, tasks
from nemotron3.evaluate import task_accuracy
from nemotron3.hf import _state_dict_for_disk, checkpoint_bytes
from nemotron3.quant import checkpoint as qckpt
from nemotron3.quantize import QuantizeConfig, quantize
from nemotron3.train.tokenizer import Tokenizer

ROWS = ("fp32", "bf16", "fp8", "nvfp4-w4a16", "nvfp4", "mxfp4", "mx9", "mx6", "mx4", "seedlm4", "seedlm3")
LOSS_SEED = 2   # held-out documents for the loss: not the calibration (1) nor the exact-match problems (0)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tok: Tokenizer, n: int) -> float:
    total, count = 0.0, 0
    for p in tasks.mixture(n, seed=LOSS_SEED, split="heldout"):
        ids = torch.tensor([[tok.bos_id, *tok.encode(p.text()), tok.eos_id]])
        logits = model(ids[:, :-1]).float()
        total += float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def weight_error(ref: dict[str, torch.Tensor], model: torch.nn.Module, names: list[str]) -> float:
    got = dict(_state_dict_for_disk(model))
    num = sum(float((got[n].float() - ref[n]).pow(2).sum()) for n in names)
    den = sum(float(ref[n].pow(2).sum()) for n in names)
    return math.sqrt(num / den)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/pretrain/final"))
    ap.add_argument("--problems", type=int, default=10, help="held-out problems per task family")
    ap.add_argument("--loss-docs", type=int, default=60, help="held-out documents for the loss")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--formats", default=",".join(ROWS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console(width=160)
    tok = Tokenizer.load(args.model)
    src = load_pretrained(args.model, dtype=torch.float32)
    ref = {k: v.detach().float() for k, v in _state_dict_for_disk(src)}
    # the matrices every format is measured on: those quantized by the scheme with the largest block (MXFP4),
    # so that no format is measured on a matrix another one keeps high
    common = sorted(qckpt.plan(src, "mxfp4")[0])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            if fmt == "fp32":
                folder, model = args.model, src
            elif fmt == "bf16":
                folder = Path(tmp) / "bf16"
                save_pretrained(load_pretrained(args.model, dtype=torch.bfloat16), folder)
                model = load_pretrained(folder, dtype=torch.float32)
            else:
                folder = quantize(QuantizeConfig(model=args.model, out=Path(tmp) / fmt, scheme=fmt, calib=args.calib),
                                  Console(quiet=True))
                model = load_pretrained(folder, dtype=torch.float32, quantize_activations=True)
            t_quant = time.perf_counter() - t0
            acc = task_accuracy(model, tok, n_per_family=args.problems)
            row = {"format": fmt, "bits": None if fmt in ("fp32", "bf16") else qckpt.bits_per_weight(fmt),
                   "bytes": checkpoint_bytes(folder), "loss": heldout_loss(model, tok, args.loss_docs),
                   "exact_match": {f: r["accuracy"] for f, r in acc.items()},
                   "weight_rel_rmse": weight_error(ref, model, common), "seconds_to_quantize": round(t_quant, 1)}
            row["mean_exact_match"] = sum(row["exact_match"].values()) / len(row["exact_match"])
            results.append(row)
            console.print(f"{fmt}: loss {row['loss']:.4f}, exact match {row['mean_exact_match']:.3f}, "
                          f"{row['bytes']:,} bytes, weight rel. RMSE {row['weight_rel_rmse']:.4f} ({t_quant:.0f} s)")
    families = sorted(results[0]["exact_match"])
    table = Table(title=f"quantized formats on {args.model} ({args.problems} held-out problems per family; "
                  f"weight error over {len(common)} GEMM matrices)")
    for col in ("format", "bits/w", "bytes", "held-out loss", *families, "mean EM", "weight rel. RMSE"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["format"], "-" if r["bits"] is None else f"{r['bits']:g}", f"{r['bytes']:,}",
                      f"{r['loss']:.4f}", *(f"{r['exact_match'][f]:.2f}" for f in families),
                      f"{r['mean_exact_match']:.3f}", f"{r['weight_rel_rmse']:.4f}")
    console.print(table)
    four = [r for r in results if r["bits"] is not None and 4 <= r["bits"] <= 4.5]
    if four:   # the weight error is the low-noise measurement; exact match moves by 1/problems per family
        best = min(four, key=lambda r: r["weight_rel_rmse"])
        console.print(f"best 4-bit format by weight error: {best['format']} ({best['weight_rel_rmse']:.4f}); "
                      f"one problem changes a family's exact match by {1 / args.problems:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "problems": args.problems, "rows": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
