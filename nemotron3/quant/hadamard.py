"""The 16-point random Hadamard transform (RHT) of the NVFP4 recipe (docs/low-precision.md §4).

Before the weight-gradient GEMM  dW = dYᵀ X  (contraction over tokens), both operands are
multiplied, 16 tokens at a time, by the same orthogonal matrix

    H = (1/4) · diag(s) · H16          (H16: Sylvester Hadamard, entries ±1; s: fixed signs)

so  (dYᵀ H)(Xᵀ H)ᵀ = dYᵀ H Hᵀ X = dYᵀ X  exactly, while each 16-block of the transformed
operands looks Gaussian: one outlier token is spread over 16, and the 1×16 NVFP4 block
scale stops being dictated by it. The sign vector is TE's hard-coded one
(`get_wgrad_sign_vector`, identical in torchao's `hadamard_utils.DEFAULT_SIGN_VECTOR`);
the paper shares one fixed vector across all layers and the whole run, and found no gain
from per-layer seeds. Whether this exact vector is the paper run's is not stated [U].

Rounding: TE applies the transform to BF16 tensors (x @ H.to(bf16), fp32 accumulation), so
its output is BF16 and the column-wise amax is taken *after* it. We compute in fp32 and round
the result to BF16 (`round_to_bf16=True`): the same up to the order of the 16-term fp32 sums.

How we compute it: the fast Walsh-Hadamard butterfly. The input is first multiplied by s/4
(exact: signs and a power of two), then four stages of (a + b, a - b) on pairs 1, 2, 4, 8
apart give x @ H16 / 4. Unlike a BLAS matmul, this fixes the summation order, so the
row layout (groups along the last dim) and the column layout (groups of 16 rows, `axis=-2`,
what the wgrad operands need without a transpose copy) give bit-identical results.
`hadamard_matrix` (Sylvester construction) and `hadamard_matrix_reference` (entry by entry,
H16[i, j] = (-1)^popcount(i & j)) are the matrices the tests check the butterfly against.
"""

from __future__ import annotations

import torch

from nemotron3.quant.fp_codecs import chunk_workspace, row_chunks, scratch

__all__ = ["TE_SIGN_VECTOR", "hadamard_matrix", "rht", "inverse_rht"]

RHT_SIZE = 16
TE_SIGN_VECTOR = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard_matrix(
    size: int = RHT_SIZE, signs: tuple[int, ...] | None = TE_SIGN_VECTOR, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(1/√size) · diag(signs) · H_size, fp32 (size, size); orthogonal. signs=None: no sign flips."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    if signs is not None and len(signs) != size:
        raise ValueError(f"need {size} signs, got {len(signs)}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < size:                                  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if signs is not None:
        h = torch.tensor(signs, dtype=torch.float32, device=device).unsqueeze(1) * h   # diag(s) @ H
    return h / size ** 0.5


def hadamard_matrix_reference(size: int = RHT_SIZE, signs: tuple[int, ...] | None = TE_SIGN_VECTOR) -> torch.Tensor:
    """Same matrix, entry by entry: s_i · (-1)^popcount(i & j) / √size."""
    s = signs if signs is not None else (1,) * size
    rows = [[s[i] * (-1) ** bin(i & j).count("1") / size ** 0.5 for j in range(size)] for i in range(size)]
    return torch.tensor(rows, dtype=torch.float32)


def _butterfly(
    v: torch.Tensor, scale: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor
) -> None:
    """out <- (v · scale) transformed by H16 along dim 1, for v (G, 16, L) fp32. a and b are
    scratch tensors of v's shape; `out` (fp32, v's shape) is written by the last stage."""
    if scale is not None:
        torch.mul(v, scale, out=a)
    else:
        a.copy_(v)
    g, _, n = a.shape
    for h in (1, 2, 4, 8):                                    # pairs h apart: (a + b, a - b)
        dst = out if h == 8 else b
        va, vb = a.view(g, 8 // h, 2, h, n), dst.view(g, 8 // h, 2, h, n)
        torch.add(va[:, :, 0], va[:, :, 1], out=vb[:, :, 0])
        torch.sub(va[:, :, 0], va[:, :, 1], out=vb[:, :, 1])
        a, b = b, a


def _transform(x: torch.Tensor, axis: int, scale: torch.Tensor | None, round_to_bf16: bool) -> torch.Tensor:
    if x.ndim != 2 and axis == -2:
        raise ValueError(f"axis=-2 needs a 2-D tensor, got shape {tuple(x.shape)}")
    dim = x.shape[axis]
    if dim % RHT_SIZE:
        raise ValueError(f"RHT needs dimension {axis} to be a multiple of {RHT_SIZE}, got shape {tuple(x.shape)}")
    x2d = x.reshape(-1, x.shape[-1]) if axis == -1 else x
    out = torch.empty(x2d.shape, dtype=torch.float32, device=x.device)
    chunks = row_chunks(x2d, 1 if axis == -1 else RHT_SIZE)
    wa, wb = chunk_workspace(x2d, chunks, 2)
    wbf = torch.empty(wa.shape, dtype=torch.bfloat16, device=x.device) if round_to_bf16 else None
    for rows in chunks:   # chunks keep the temporaries in cache (16-row aligned for axis=-2)
        c = x2d[rows].to(torch.float32)
        groups = c.reshape(-1, RHT_SIZE, 1) if axis == -1 else c.view(-1, RHT_SIZE, c.shape[1])
        y = out[rows]
        _butterfly(groups, scale, scratch(wa, groups), scratch(wb, groups), y.view(groups.shape))
        if round_to_bf16:                                     # BF16 rounding, per chunk
            y.copy_(scratch(wbf, y, torch.bfloat16).copy_(y))
    return out.view(x.shape)


_SCALES: dict[tuple[torch.device, tuple[int, ...] | None, int], torch.Tensor] = {}


def _sign_scale(device: torch.device, signs: tuple[int, ...] | None, axis: int) -> torch.Tensor:
    key = (device, signs, axis)
    if key not in _SCALES:
        s = torch.tensor(signs if signs is not None else (1,) * RHT_SIZE, dtype=torch.float32, device=device) / 4
        _SCALES[key] = s.view(1, RHT_SIZE, 1)
    return _SCALES[key]


def rht(
    x: torch.Tensor, round_to_bf16: bool = True, signs: tuple[int, ...] | None = TE_SIGN_VECTOR,
    axis: int = -1,
) -> torch.Tensor:
    """x @ H on each group of 16 along `axis` (-1: the last dim; -2: the rows of a 2-D tensor,
    i.e. rht(x.mT).mT without the transpose). fp32 out, BF16-valued if `round_to_bf16`."""
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 or -2, got {axis}")
    return _transform(x, axis, _sign_scale(x.device, signs, axis), round_to_bf16)


def inverse_rht(y: torch.Tensor, signs: tuple[int, ...] | None = TE_SIGN_VECTOR, axis: int = -1) -> torch.Tensor:
    """Undo `rht` (without its BF16 rounding): y @ Hᵀ = (y @ H16 / 4) · s per group of 16."""
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 or -2, got {axis}")
    z = _transform(y, axis, torch.full((1, RHT_SIZE, 1), 0.25, device=y.device), round_to_bf16=False)
    s = torch.tensor(signs if signs is not None else (1,) * RHT_SIZE, dtype=torch.float32, device=y.device)
    if axis == -1:
        return (z.view(*z.shape[:-1], -1, RHT_SIZE) * s).view(z.shape)
    return (z.view(-1, RHT_SIZE, z.shape[-1]) * s.view(1, RHT_SIZE, 1)).view(z.shape)
