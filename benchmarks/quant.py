"""Quantization speed against torchao, and NVFP4 training-step cost against nn.Linear.

    .venv/bin/python benchmarks/quant.py            # a few seconds per line on 2 CPU cores
    .venv/bin/python benchmarks/quant.py --quick    # smaller tensors
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant.py --threads 1   # one core (shared machine)

Part 1 quantizes the same tensors with ours and with torchao 0.18 (bit-identical outputs,
checked here too) and prints elements/s and the ratio ours/torchao (goal >= 1).
Part 2 times one training step (forward + backward of the layer) of NVFP4Linear and
MXFP8Linear against an unquantized fp32 nn.Linear with the same weights, for a few small
realistic shapes, and prints the ratio (goal for NVFP4 <= 2). Both sides of every ratio
are measured in the same run, interleaved, taking the best of several repeats, so load
from other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn

from nemotron3.quant import MXFP8Linear, NVFP4Linear, formats


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of fn_a and fn_b, run alternately after one warm-up call each.

    The minimum is the least noisy estimate on a shared machine (other load only adds time)."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return min(ta), min(tb)


def bench_quantize(rows: int, cols: int, repeats: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    n = x.numel()
    print(f"\n== quantize a ({rows}, {cols}) fp32 tensor: Melem/s, ours vs torchao 0.18 ==")
    print(f"{'format':34s} {'ours':>9s} {'torchao':>9s} {'ratio':>7s}  bit-identical")
    pts = per_tensor_amax_to_scale(x.abs().max())
    rows_out = [
        ("nvfp4 torchao, single level", lambda: formats.nvfp4_quantize(x, None, "torchao"),
         lambda: NVFP4Tensor.to_nvfp4(x), lambda o, r: torch.equal(o.packed, r.qdata)),
        ("nvfp4 torchao, per-tensor scale", lambda: formats.nvfp4_quantize(x, pts, "torchao"),
         lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts), lambda o, r: torch.equal(o.packed, r.qdata)),
        ("nvfp4 te (vs torchao two-level)", lambda: formats.nvfp4_quantize(x),
         lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts), None),
    ]
    ao_elem = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp6_e2m3": "fp6_e2m3",
               "fp6_e3m2": "fp6_e3m2", "fp4_e2m1": torch.float4_e2m1fn_x2}
    ao_mode = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}
    for elem, ae in ao_elem.items():
        for mode, am in ao_mode.items():
            rows_out.append((
                f"mx {elem} {mode}", lambda e=elem, m=mode: formats.mx_quantize(x, e, m),
                lambda ae=ae, am=am: MXTensor.to_mx(x, ae, 32, am),
                lambda o, r: torch.equal(o.scales.view(torch.uint8), r.scale.view(torch.uint8))
                and torch.equal(o.qdata.view(torch.uint8), r.qdata.view(torch.uint8)),
            ))
    for name, ours, ref, same in rows_out:
        t_ours, t_ref = timed_pair(ours, ref, repeats)
        ident = "-" if same is None else ("yes" if same(ours(), ref()) else "NO")
        print(f"{name:34s} {n / t_ours / 1e6:9.1f} {n / t_ref / 1e6:9.1f} {t_ref / t_ours:6.2f}x  {ident}")


def bench_linear(shapes: list[tuple[int, int, int]], repeats: int) -> None:
    print("\n== one training step (fwd + bwd), fp32 activations: ms, and ratio to nn.Linear ==")
    worst = {"NVFP4": 0.0, "MXFP8": 0.0}
    print(f"{'tokens x in -> out':24s} {'nn.Linear':>10s} {'NVFP4':>9s} {'ratio':>7s} {'MXFP8':>9s} {'ratio':>7s}")
    for M, K, N in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(K, N, bias=False)
        nv = NVFP4Linear.from_float(nn.Linear(K, N, bias=False))
        mx = MXFP8Linear.from_float(nn.Linear(K, N, bias=False))
        for layer in (nv, mx):
            layer.load_state_dict(lin.state_dict())
        x = torch.randn(M, K, requires_grad=True)
        dy = torch.randn(M, N)

        def step(layer, x=x, dy=dy):
            def run():
                x.grad = None
                layer.weight.grad = None
                layer(x).backward(dy)
            return run

        t_lin, t_nv = timed_pair(step(lin), step(nv), repeats)
        t_lin2, t_mx = timed_pair(step(lin), step(mx), repeats)
        t_lin = min(t_lin, t_lin2)
        print(f"{M:5d} x {K:5d} -> {N:5d}     {t_lin * 1e3:10.1f} {t_nv * 1e3:9.1f} {t_nv / t_lin:6.2f}x "
              f"{t_mx * 1e3:9.1f} {t_mx / t_lin:6.2f}x")
        worst = {"NVFP4": max(worst["NVFP4"], t_nv / t_lin), "MXFP8": max(worst["MXFP8"], t_mx / t_lin)}
    for name, r in worst.items():
        print(f"{name}: at most {r:.2f}x nn.Linear (goal <= 2x): {'met' if r <= 2 else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller tensors, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--part", choices=("all", "quantize", "step"), default="all", help="run one part only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("all", "quantize"):
        bench_quantize(*((1024, 2048) if args.quick else (2048, 4096)), repeats)
    if args.part in ("all", "step"):
        shapes = [(2048, 1024, 1024), (2048, 1024, 4096), (4096, 2048, 512)]
        bench_linear(shapes[:1] if args.quick else shapes, repeats)


if __name__ == "__main__":
    main()
