"""The SSD backend switch (model/ssd_kernels.py) on the CPU: auto stays on our PyTorch scan, a forced mamba_ssm
that cannot run is a one-line error, and the environment variable is read. The kernels themselves are compared
with the PyTorch scan on a GPU (tests/gpu/test_ssd_kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nemotron3.model import ssd_kernels
from nemotron3.model.ssd import ssd_chunked


def _inputs(seed: int = 0, b: int = 2, t: int = 37, h: int = 4, p: int = 8, g: int = 2, n: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = torch.rand(b, t, h, generator=gen) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen) - 0.1
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    return x, dt, A, B, C


@pytest.fixture
def backend():
    saved = ssd_kernels._backend
    yield ssd_kernels.set_ssd_backend
    ssd_kernels._backend = saved


def test_auto_on_the_cpu_is_the_pytorch_scan(backend):
    backend("auto")
    x, dt, A, B, C = _inputs()
    assert ssd_kernels.resolve_backend(x) == "torch"
    init = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(1))
    y, s = ssd_kernels.ssd_scan(x, dt, A, B, C, 16, D=torch.ones(4), initial_state=init)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 16, D=torch.ones(4), initial_state=init)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)  # the same code on the same inputs: exact


def test_a_forced_kernel_that_cannot_run_is_one_line(backend):
    backend("mamba_ssm")
    x, dt, A, B, C = _inputs()
    with pytest.raises(ValueError, match=r"^NEMOTRON3_SSD_BACKEND=mamba_ssm needs tensors on CUDA; use auto or torch$"):
        ssd_kernels.ssd_scan(x, dt, A, B, C, 16)


def test_an_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="SSD backend 'triton': expected one of"):
        backend("triton")


def test_the_environment_variable_chooses_the_backend():
    code = ("import torch; from nemotron3.model import ssd_kernels as k; "
            "print(k.resolve_backend(torch.zeros(1)))")
    env = {**os.environ, "NEMOTRON3_SSD_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["NEMOTRON3_SSD_BACKEND"] = "cuda-please"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "NEMOTRON3_SSD_BACKEND='cuda-please': expected one of" in bad.stderr
