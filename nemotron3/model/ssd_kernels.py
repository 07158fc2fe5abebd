"""The chunked SSD scan through mamba_ssm's Triton kernels on CUDA, beside our PyTorch `ssd_chunked`.

`ssd_scan` is what the Mamba-2 mixer calls for a whole sequence (training, prefill). It takes the same
arguments as `model.ssd.ssd_chunked` and returns the same (y, final state), both fp32:

    backend "torch"      ssd_chunked: the reference, and the only path on the CPU
    backend "mamba_ssm"  mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (the optional extra
                         `mamba`: `MAMBA_SKIP_CUDA_BUILD=TRUE pip install mamba-ssm`, no CUDA extension needed),
                         with dt already softplus-ed and clamped by the mixer (so dt_softplus=False, no dt_limit)
    backend "auto"       mamba_ssm when the tensors are on CUDA and the package imports, else torch

The backend is a process setting, `NEMOTRON3_SSD_BACKEND` (default auto) or `set_ssd_backend`, not a model
field: it changes the arithmetic's order, not the model. The two agree to float tolerance, not bit for bit (the
kernels sum in another order and their matmuls may use TF32); tests/gpu/test_ssd_kernels.py compares outputs,
final states and gradients on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from nemotron3.model.ssd import ssd_chunked

BACKENDS = ("auto", "torch", "mamba_ssm")
_backend = os.environ.get("NEMOTRON3_SSD_BACKEND", "auto")


def set_ssd_backend(name: str) -> None:
    """Choose the scan for this process: "auto", "torch" or "mamba_ssm"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"SSD backend {name!r}: expected one of {BACKENDS}")
    _backend = name


@functools.cache
def _mamba_chunk_scan():
    """mamba_ssm's combined chunk scan, or None when the package (or triton) does not import."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def resolve_backend(x: torch.Tensor) -> str:
    """The backend `ssd_scan` uses for tensors like x; a forced one that cannot run is a one-line error."""
    if _backend not in BACKENDS:
        raise ValueError(f"NEMOTRON3_SSD_BACKEND={_backend!r}: expected one of {BACKENDS}")
    if _backend == "torch":
        return "torch"
    available = x.is_cuda and _mamba_chunk_scan() is not None
    if _backend == "mamba_ssm" and not available:
        why = "tensors on CUDA" if not x.is_cuda else "the `mamba` extra (pip install mamba-ssm)"
        raise ValueError(f"NEMOTRON3_SSD_BACKEND=mamba_ssm needs {why}; use auto or torch")
    return "mamba_ssm" if available else "torch"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, t, h, p), dt (b, t, h) post-softplus, A (h,), B/C (b, t, g, n), D (h,), initial_state (b, h, p, n)
    -> y (b, t, h, p) fp32 and the final state (b, h, p, n) fp32, by the backend `resolve_backend` picks."""
    if resolve_backend(x) == "torch":
        return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    scan = _mamba_chunk_scan()
    init = None if initial_state is None else initial_state.float()
    y, state = scan(x, dt, A.float(), B, C, chunk_size, D=None if D is None else D.float(),
                    initial_states=init, return_final_states=True)
    return y.float(), state.float()
