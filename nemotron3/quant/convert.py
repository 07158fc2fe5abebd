"""Put a built model on the NVFP4 training recipe (and take it off again), by module name.

Which layers Nemotron 3 Super keeps out of NVFP4 (NVIDIA's Super recipe and the Nemotron 3 white paper §2.4;
docs/low-precision.md §5):

    what                                   precision here          why
    last ~15% of the layers                high (fp32 master)      the paper: loss diverges without a BF16 tail
    latent projections fc1/fc2_latent_proj high                    small, and every routed token passes them
    MTP block (mtp.*)                      high                    `keep_mtp_spec_in_bf16`
    attention q/k/v/o                      high                    few layers, outlier-prone
    embeddings, lm_head                    high                    as in every FP4/FP8 recipe
    Mamba out_proj                         MXFP8                   NVFP4 flushed up to 40% of its values to zero on Nano
    router (gate.weight)                   fp32                    a Parameter, never a Linear: untouched
    everything else (Mamba in_proj, shared NVFP4                   the bulk of the FLOPs
    and routed experts, dense MLPs)

"High precision" on a CPU means fp32 (the model's own dtype); on a GPU it is BF16. The tail is the last
`ceil(high_precision_tail · n_layers)` backbone layers: 14 of Super's 88 (15.9%), which is also what a
third-party GB200 launch script sets (`--num-layers-at-end-in-bf16 14`) [UNCONFIRMED as NVIDIA's exact
setting]. The 12B paper model also kept its first 2 blocks in BF16: `high_precision_head_layers=2`.

The swap keeps every Parameter object (the optimizer state stays valid) and every name (checkpoints
look the same). Routed experts are 3-D tensors, not nn.Linear: their per-expert GEMMs go through the
same quantized autograd function via `Experts.linear` and a `gemm_quantizer` attribute.
`switch_to_high_precision(model)` undoes all of it, for the end-of-training switch the paper describes
(App. D: switching the last ~18% of tokens to BF16 closes the loss gap).
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from nemotron3.model.moe import Experts
from nemotron3.options import derive_seed
from nemotron3.quant.mxfp8_linear import MXFP8Linear, MXFP8Recipe
from nemotron3.quant.nvfp4_linear import NVFP4Linear, NVFP4Recipe
from nemotron3.quant.qlinear import QuantizedLinear, _QuantizedLinearFn

__all__ = ["PrecisionPolicy", "convert_to_nvfp4", "switch_to_high_precision", "module_precision", "precision_summary"]

_LAYER_RE = re.compile(r"^backbone\.layers\.(\d+)\.")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which layers get which format. The defaults are Super's recipe (see the module docstring)."""

    high_precision_tail: float = 0.15
    high_precision_head_layers: int = 0
    keep_attention: bool = True
    keep_latent_proj: bool = True
    keep_mtp: bool = True
    mamba_out_proj: str = "mxfp8"  # "mxfp8", "nvfp4" or "high"
    quantize_experts: bool = True
    recipe: NVFP4Recipe = field(default_factory=NVFP4Recipe)
    mxfp8: MXFP8Recipe = field(default_factory=MXFP8Recipe)

    def __post_init__(self) -> None:
        if not 0.0 <= self.high_precision_tail <= 1.0:
            raise ValueError(f"high_precision_tail must be in [0, 1], got {self.high_precision_tail}")
        if self.mamba_out_proj not in ("mxfp8", "nvfp4", "high"):
            raise ValueError(f"mamba_out_proj must be 'mxfp8', 'nvfp4' or 'high', got {self.mamba_out_proj!r}")

    def layer_is_high(self, index: int, n_layers: int) -> bool:
        tail = math.ceil(self.high_precision_tail * n_layers)
        return index < self.high_precision_head_layers or index >= n_layers - tail

    def choose(self, fqn: str, n_layers: int, is_mamba_out: bool = False) -> str:
        """'nvfp4', 'mxfp8' or 'high' for the Linear (or Experts) at fully-qualified name `fqn`."""
        if not fqn.startswith("backbone.layers."):
            return "high" if (self.keep_mtp or not fqn.startswith("mtp.")) else "nvfp4"  # lm_head, mtp.*
        m = _LAYER_RE.match(fqn)
        if m and self.layer_is_high(int(m.group(1)), n_layers):
            return "high"
        leaf = fqn.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") and self.keep_attention:
            return "high"
        if leaf in ("fc1_latent_proj", "fc2_latent_proj") and self.keep_latent_proj:
            return "high"
        if is_mamba_out:
            return self.mamba_out_proj
        if leaf == "experts" and not self.quantize_experts:
            return "high"
        return "nvfp4"


class ExpertGemm:
    """The quantized GEMM the routed experts of one layer run on (a plain object, so that it adds no
    Parameter and no state_dict entry). One stochastic-rounding stream per layer."""

    def __init__(self, recipe: NVFP4Recipe, seed: int) -> None:
        with torch.device("meta"):
            self.layer = NVFP4Linear(16, 16, bias=False, recipe=recipe, seed=seed)

    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (n, in) · wᵀ (in, out) -> (n, out) with NVFP4 operands in all three GEMMs."""
        if w.dtype != torch.float32:
            raise TypeError(f"NVFP4 experts keep fp32 master weights, got {w.dtype}")
        return _QuantizedLinearFn.apply(x, w, self.layer)


def _seed(base: int, fqn: str) -> int:
    return derive_seed(base, zlib.crc32(fqn.encode()))


def convert_to_nvfp4(model: nn.Module, policy: PrecisionPolicy | None = None) -> nn.Module:
    """Swap the model's nn.Linear layers (and routed experts) to the NVFP4 / MXFP8 training recipe, in place.

    Works on any HybridLM; returns the model. Converting twice is an error (convert a model once).
    """
    policy = policy or PrecisionPolicy()
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("model already has quantized layers; call switch_to_high_precision first")
    n_layers = len(model.backbone.layers)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, Experts):
                if policy.choose(fqn, n_layers) == "nvfp4":
                    child.gemm_quantizer = ExpertGemm(policy.recipe, _seed(policy.recipe.seed, fqn))
                continue
            if type(child) is not nn.Linear:
                continue
            is_mamba_out = name == "out_proj" and hasattr(parent, "A_log")
            kind = policy.choose(fqn, n_layers, is_mamba_out)
            if kind == "nvfp4":
                setattr(parent, name, NVFP4Linear.from_float(child, policy.recipe, seed=_seed(policy.recipe.seed, fqn)))
            elif kind == "mxfp8":
                setattr(parent, name, MXFP8Linear.from_float(child, policy.mxfp8))
    return model


def switch_to_high_precision(model: nn.Module) -> nn.Module:
    """Undo `convert_to_nvfp4`: plain nn.Linear around the same Parameters, unquantized expert GEMMs."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Experts):
                child.__dict__.pop("gemm_quantizer", None)
            elif isinstance(child, QuantizedLinear):
                with torch.device("meta"):
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight = child.weight
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, name, plain)
    return model


def module_precision(mod: nn.Module) -> str | None:
    """'nvfp4', 'mxfp8' or 'high' for a module that owns GEMM weights (a Linear or routed Experts), else None."""
    if isinstance(mod, Experts):
        return "nvfp4" if mod.__dict__.get("gemm_quantizer") is not None else "high"
    if isinstance(mod, NVFP4Linear):
        return "nvfp4"
    if isinstance(mod, MXFP8Linear):
        return "mxfp8"
    return "high" if isinstance(mod, nn.Linear) else None


def precision_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts per precision: {'nvfp4': ..., 'mxfp8': ..., 'high': ...} (linear weights and experts)."""
    counts: Counter[str] = Counter()
    for mod in model.modules():
        kind = module_precision(mod)
        if kind is not None:
            counts[kind] += (mod.up_proj.numel() + mod.down_proj.numel() if isinstance(mod, Experts)
                             else mod.weight.numel())
    return dict(counts)
