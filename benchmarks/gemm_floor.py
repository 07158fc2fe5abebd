"""The matrix-product floor of a workload: its GEMMs and attention kernels replayed alone, same shapes.

    from gemm_floor import record, replayer, replay_seconds
    calls = record(lambda: model(ids))        # every mm / addmm / bmm / SDPA kernel the call dispatches
    replay_seconds(calls)                      # seconds those kernels alone take, on inputs of the same layouts
    replayer(calls)                            # the replay as a function, to time beside the real thing

At the sizes this machine trains and prefills (T9: d = 256, a few thousand tokens), the forward of a
hybrid MoE model is dominated by matrix products that every implementation of the same model must do:
the projections, the experts, the LM head, attention. Replaying exactly those kernels, without any of
the elementwise work, indexing or Python around them, gives a floor that no implementation doing the
same arithmetic in fp32 can beat on this CPU. Printing it beside a peer's time says how much of a
speed ratio is left to win at all (benchmarks/forward.py uses it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default}
BACKWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS or func in ATTENTION or func in BACKWARD:
            shapes = [(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, shapes, dict(kwargs)))
        return func(*args, **kwargs)


def record(fn: Callable[[], object]) -> list[tuple]:
    """Run `fn` once and return the matrix-product kernels it dispatched: (op, argument (shape, stride)s, kwargs)."""
    rec = _Recorder()
    with rec:
        fn()
    return rec.calls


def _materialise(shapes: list, gen: torch.Generator, pool: dict) -> list:
    """Inputs with the recorded shapes and strides (a transposed weight stays transposed), one tensor per
    distinct layout shared by every call that has it: the replay then reads warm memory, as a well-fused
    implementation would, and the floor errs on the low side."""
    out = []
    for s in shapes:
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], tuple):
            if s not in pool:
                shape, stride = s
                size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
                pool[s] = torch.randn(size, generator=gen).as_strided(shape, stride)
            out.append(pool[s])
        else:
            out.append(s)
    return out


def replayer(calls: list[tuple]) -> Callable[[], None]:
    """A function that runs the recorded kernels back to back on fresh inputs of the same layouts."""
    gen = torch.Generator().manual_seed(0)
    pool: dict = {}
    prepared = [(op, _materialise(shapes, gen, pool), kw) for op, shapes, kw in calls]

    def replay() -> None:
        with torch.no_grad():
            for op, args, kw in prepared:
                op(*args, **kw)

    return replay


def replay_seconds(calls: list[tuple], repeats: int = 5) -> float:
    """Best-of-`repeats` seconds of the recorded kernels (`replayer`), after one warm-up pass."""
    replay = replayer(calls)
    replay()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        replay()
        best = min(best, time.perf_counter() - t0)
    return best
