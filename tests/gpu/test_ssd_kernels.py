"""mamba_ssm's Triton SSD kernels (model/ssd_kernels.py, the optional extra `mamba`) against our PyTorch scan on the
same GPU: outputs, final states and gradients. Skipped without CUDA or without mamba_ssm.

Tolerance: 2e-2 of the reference's largest magnitude. The kernels sum in another order and their fp32 matmuls
may run in TF32 (10-bit mantissa, ~5e-4 relative per product) over chunks of up to 256 terms; the bound is a
choice, not yet checked on a GPU (no GPU was lent when this was written, 2026-12-04)."""

from __future__ import annotations

import pytest
import torch

from nemotron3.model import ssd_kernels
from nemotron3.model.ssd import ssd_chunked
from nemotron3.options import resolve_device
from tests.conftest import gpu_test_device

pytestmark = pytest.mark.gpu
TOL = 2e-2


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = resolve_device(gpu_test_device())
    if dev.type != "cuda" or ssd_kernels._mamba_chunk_scan() is None:
        pytest.skip("needs CUDA and mamba_ssm (pip install '.[mamba]' with MAMBA_SKIP_CUDA_BUILD=TRUE)")
    return dev


def _inputs(device, b=2, t=300, h=8, p=16, g=2, n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = torch.rand(b, t, h, generator=gen) * 0.2 + 0.01
    A = -torch.rand(h, generator=gen) - 0.5
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    D, init = torch.randn(h, generator=gen), torch.randn(b, h, p, n, generator=gen)
    return [v.to(device).requires_grad_() for v in (x, dt, A, B, C, D, init)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


@pytest.mark.parametrize("chunk", [64, 128])
def test_the_kernel_equals_the_pytorch_scan(device, chunk):
    ssd_kernels.set_ssd_backend("mamba_ssm")
    try:
        ins = _inputs(device)
        x, dt, A, B, C, D, init = ins
        y, s = ssd_kernels.ssd_scan(x, dt, A, B, C, chunk, D=D, initial_state=init)
        ref_ins = [v.detach().clone().requires_grad_() for v in ins]
        y_ref, s_ref = ssd_chunked(*ref_ins[:5], chunk, D=ref_ins[5], initial_state=ref_ins[6])
        assert _close(y, y_ref) and _close(s, s_ref)
        w = torch.randn_like(y_ref)
        ((y * w).sum() + s.sum()).backward()
        ((y_ref * w).sum() + s_ref.sum()).backward()
        for name, got, want in zip("x dt A B C D init".split(), ins, ref_ins):
            assert _close(got.grad, want.grad), name
    finally:
        ssd_kernels.set_ssd_backend("auto")
