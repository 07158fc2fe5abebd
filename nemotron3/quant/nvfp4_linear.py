"""NVFP4 training: the recipe Nemotron 3 Super was pretrained with (arXiv 2509.25149, docs/low-precision.md §4).

`NVFP4Linear` is an nn.Linear whose three GEMMs (fprop, dgrad, wgrad; see qlinear.py for the
shared autograd.Function) take NVFP4 operands quantized exactly as the paper and
TransformerEngine's `NVFP4BlockScaling` recipe prescribe:

  operand            used in        blocks             RHT    rounding
  x   (rowwise)      fprop          1×16 along K       no     RNE
  W   (rowwise)      fprop          16×16 tiles        no     RNE
  Wᵀ  (columnwise)   dgrad          same 16×16 tiles   no     RNE   (= transpose of W's copy)
  dy  (rowwise)      dgrad          1×16 along N       no     stochastic
  dyᵀ (columnwise)   wgrad          1×16 along M       yes    stochastic
  xᵀ  (columnwise)   wgrad          1×16 along M       yes    RNE

Why each choice (paper §4 and App. E; TE `common/recipe/__init__.py`):
* 2-D weight tiles make the weight's rowwise and columnwise copies one tensor, so fprop and
  dgrad see the *same* quantized W: the chain rule is applied to the function the forward
  pass actually computed. 1×16 weight blocks along different axes would give two different
  Ws. Activations and gradients stay 1×16: finer blocks track their outliers better, and
  their two copies are used by different GEMMs anyway.
* The 16-point random Hadamard transform (hadamard.py) goes on the wgrad operands only:
  wgrad contracts over tokens, where outliers are worst, and HᵀH = I leaves dW unchanged in
  exact arithmetic. The paper found RHT on fprop/dgrad harmful at 1.2B. The transform's
  output is rounded to BF16 (TE runs it on BF16 tensors) and the per-tensor amax of those
  copies is taken after it.
* Stochastic rounding on gradients only (both the dgrad and the wgrad operand): gradients are
  summed over many steps, so an unbiased rounding keeps small updates from vanishing; the
  paper reports divergence when SR is put on activations or weights. Weights and activations
  use round-to-nearest-even.
* Per-tensor scales: every copy gets its own amax-derived fp32 scale (TE's `te` convention in
  nvfp4.py: single-rounding block scale, no lower clamp, zero-scale blocks).

The GEMMs are emulated: each quantized operand is dequantized to fp32 (nvfp4_fake_quantize,
bit-identical to decoding the real codes) and multiplied with an fp32 matmul, which matches
the hardware's fp32 accumulation up to summation order. Nothing here needs a GPU. The
columnwise copies are quantized in place in the (tokens, features) layout with `axis=-2`
(blocks of 16 rows), bit-identical to quantizing the transposes, which are never built.

Stochastic rounding draws 8 bits per element from a torch.Generator owned by the module,
seeded with `seed` (default `recipe.seed`), so a CPU run is reproducible: each backward draws
the bytes of dy (row-major), then those of the RHT'd dyᵀ (row-major of dyᵀ). Give each layer its
own seed (convert passes one per module name) so layers do not share a noise stream. The
generator state is not part of the state_dict.

K (in_features), N (out_features) and the token count need not be multiples of 16: each
contraction dimension is zero-padded to one before quantizing and the padding is sliced off
(qlinear.py). `formats.nvfp4_quantize` itself raises on a last dim that is not a multiple
of 16.

Every switch can be turned off for ablations: NVFP4Recipe(rht=False), (stochastic_rounding=
False), (weight_2d=False: 1×16 weight blocks along K for fprop and along N for dgrad, each
copy with its own scales, as TE's `disable_2d_quantization`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from nemotron3.quant.hadamard import rht
from nemotron3.quant.nvfp4 import nvfp4_fake_quantize
from nemotron3.quant.qlinear import QuantizedLinear, pad_rows

__all__ = ["NVFP4Recipe", "NVFP4Linear"]


@dataclass(frozen=True)
class NVFP4Recipe:
    """Switches of the NVFP4 training recipe; the defaults are the paper's."""

    rht: bool = True                  # 16-point RHT on the wgrad operands
    stochastic_rounding: bool = True  # SR on the gradient operands (dgrad and wgrad)
    weight_2d: bool = True            # 16x16 weight tiles (else 1x16 blocks per GEMM)
    seed: int = 0                     # default seed of each layer's SR generator


class NVFP4Linear(QuantizedLinear):
    """nn.Linear with NVFP4 fprop, dgrad and wgrad; fp32 master weight. See the module docstring."""

    block_size = 16
    recipe_type = NVFP4Recipe

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        recipe: NVFP4Recipe | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, recipe)
        self.seed = self.recipe.seed if seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_float(cls, linear: nn.Linear, recipe: NVFP4Recipe | None = None, seed: int | None = None) -> NVFP4Linear:
        """Wrap an existing nn.Linear (its parameters are reused, as fp32)."""
        return cls._swap_from(linear, recipe=recipe, seed=seed)

    def generator(self, device: torch.device) -> torch.Generator:
        """This layer's stochastic-rounding generator on `device` (created, seeded, on first use)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _grad_kwargs(self, t: torch.Tensor) -> dict:
        if not self.recipe.stochastic_rounding:
            return {}
        return {"stochastic_rounding": True, "generator": self.generator(t.device)}

    def quantize_x(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_fake_quantize(x)

    def quantize_x_t(self, x: torch.Tensor) -> torch.Tensor:
        return self._columnwise(x, {})

    def quantize_w(self, w: torch.Tensor) -> torch.Tensor:
        return nvfp4_fake_quantize(w, block_2d=self.recipe.weight_2d)

    def quantize_w_t(self, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        if self.recipe.weight_2d:                      # same tiles: the fprop copy itself
            return pad_rows(wq[:, : w.shape[1]], self.block_size)
        return nvfp4_fake_quantize(w, axis=-2)

    def quantize_grad(self, dy: torch.Tensor) -> torch.Tensor:
        return nvfp4_fake_quantize(dy, **self._grad_kwargs(dy))

    def quantize_grad_t(self, dy: torch.Tensor) -> torch.Tensor:
        return self._columnwise(dy, self._grad_kwargs(dy))

    def _columnwise(self, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """A wgrad operand: blocks of 16 tokens down the columns, after the RHT if enabled."""
        if not self.recipe.rht:
            return nvfp4_fake_quantize(t, axis=-2, **kwargs)
        h = rht(t, axis=-2)                            # a fresh buffer: quantize it in place
        return nvfp4_fake_quantize(h, axis=-2, out=h, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", seed={self.seed}"
