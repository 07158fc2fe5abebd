"""The 16-point random Hadamard transform (RHT) of the NVFP4 recipe (LOWPREC §2.2).

Before the weight-gradient GEMM  dW = dYᵀ X  (contraction over tokens), both operands are
multiplied, 16 tokens at a time, by the same orthogonal matrix

    H = (1/4) · diag(s) · H16          (H16: Sylvester Hadamard, entries ±1; s: fixed signs)

so  (dYᵀ H)(Xᵀ H)ᵀ = dYᵀ H Hᵀ X = dYᵀ X  exactly, while each 16-block of the transformed
operands looks Gaussian: one outlier token is spread over 16, and the 1×16 NVFP4 block
scale stops being dictated by it. The sign vector is TE's hard-coded one
(`get_wgrad_sign_vector`, identical in torchao's `hadamard_utils.DEFAULT_SIGN_VECTOR`);
the paper shares one fixed vector across all layers and the whole run, and found no gain
from per-layer seeds. Whether this exact vector is the paper run's is not stated [U].

Rounding: TE applies the transform to BF16 tensors (x @ H.to(bf16) with fp32 accumulation),
so its output is BF16, and the column-wise amax is taken *after* it. We compute in fp32 and
round the result to BF16 (`round_to_bf16=True`), which is the same up to the order of the
16-term fp32 sums; all entries of H are ±0.25 and exact in BF16.

The fast path is one (n·16, 16) @ (16, 16) matmul; `hadamard_matrix_reference` builds H
entry by entry from H16[i, j] = (-1)^popcount(i & j) for the tests.
"""

from __future__ import annotations

import torch

__all__ = ["TE_SIGN_VECTOR", "hadamard_matrix", "rht", "inverse_rht"]

RHT_SIZE = 16
TE_SIGN_VECTOR = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)

_CACHE: dict[tuple[torch.device, tuple[int, ...] | None], torch.Tensor] = {}


def hadamard_matrix(
    size: int = RHT_SIZE, signs: tuple[int, ...] | None = TE_SIGN_VECTOR, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(1/√size) · diag(signs) · H_size, fp32 (size, size); orthogonal. signs=None: no sign flips."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    if signs is not None and len(signs) != size:
        raise ValueError(f"need {size} signs, got {len(signs)}")
    h = torch.ones(1, 1)
    while h.shape[0] < size:                                  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if signs is not None:
        h = torch.tensor(signs, dtype=torch.float32).unsqueeze(1) * h   # diag(s) @ H
    return (h / size ** 0.5).to(device)


def hadamard_matrix_reference(size: int = RHT_SIZE, signs: tuple[int, ...] | None = TE_SIGN_VECTOR) -> torch.Tensor:
    """Same matrix, entry by entry: s_i · (-1)^popcount(i & j) / √size."""
    s = signs if signs is not None else (1,) * size
    rows = [[s[i] * (-1) ** bin(i & j).count("1") / size ** 0.5 for j in range(size)] for i in range(size)]
    return torch.tensor(rows, dtype=torch.float32)


def _matrix(device: torch.device, signs: tuple[int, ...] | None) -> torch.Tensor:
    key = (device, signs)
    if key not in _CACHE:
        _CACHE[key] = hadamard_matrix(RHT_SIZE, signs, device)
    return _CACHE[key]


def rht(x: torch.Tensor, round_to_bf16: bool = True, signs: tuple[int, ...] | None = TE_SIGN_VECTOR) -> torch.Tensor:
    """Apply H to each group of 16 along the last dim (a multiple of 16). fp32 out (BF16-valued)."""
    if x.shape[-1] % RHT_SIZE:
        raise ValueError(f"RHT needs the last dimension to be a multiple of {RHT_SIZE}, got shape {tuple(x.shape)}")
    y = (x.to(torch.float32).reshape(-1, RHT_SIZE) @ _matrix(x.device, signs)).view(x.shape)
    return y.to(torch.bfloat16).to(torch.float32) if round_to_bf16 else y


def inverse_rht(y: torch.Tensor, signs: tuple[int, ...] | None = TE_SIGN_VECTOR) -> torch.Tensor:
    """Undo `rht` (without its BF16 rounding): multiply each 16-group by Hᵀ."""
    if y.shape[-1] % RHT_SIZE:
        raise ValueError(f"RHT needs the last dimension to be a multiple of {RHT_SIZE}, got shape {tuple(y.shape)}")
    return (y.to(torch.float32).reshape(-1, RHT_SIZE) @ _matrix(y.device, signs).t()).view(y.shape)
