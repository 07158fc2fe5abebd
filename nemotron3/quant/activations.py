"""Activations of the quantized checkpoints: their emulation at inference and the calibration that sets NVFP4's
static input scales (docs/low-precision.md §7).

`emulate_activations` (what `load(..., quantize_activations=True)` installs): nvfp4 runs each quantized layer's
input through vLLM's emulation, block scale e4m3(min(gs · amax_b · (1/6), 448)), elements e2m1(x / (scale / gs)),
back as q · (scale / gs), with the layer's calibrated encode-form global scale gs; fp8 through a dynamic per-token
e4m3 quantization (s_t = amax_t / 448). The other schemes are weight-only. The routed experts get theirs through
the experts' `gemm_quantizer` hook, which knows each expert's disk name (nemotron3/hf.py's rule).

`calibrate` records max |input| of every quantized GEMM over a few documents; `input_global_scale` turns it into
448·6 / amax, the encode-form scale compressed-tensors stores as `input_global_scale`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.hf import EXPERT_PROJS, CheckpointError, expert_module
from nemotron3.model.moe import Experts
from nemotron3.quant.fp_codecs import round_magnitude_, round_to_format
from nemotron3.quant.nvfp4 import te_global_scales

__all__ = ["nvfp4_activation_fake_quantize", "fp8_activation_fake_quantize", "emulate_activations", "calibrate",
           "input_global_scale"]

_E4M3_MAX, _E2M1_MAX = 448.0, 6.0


def nvfp4_activation_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """vLLM's NVFP4 emulation of an activation (..., K) with an encode-form global scale (see the docstring)."""
    xb = x.to(torch.float32).unflatten(-1, (-1, 16))
    amax = xb.abs().amax(-1, keepdim=True)
    gs = global_scale.to(torch.float32).reshape(())
    scale = round_magnitude_((gs * amax * (1.0 / _E2M1_MAX)).clamp(max=_E4M3_MAX), "e4m3")
    dec = scale / gs
    inv = torch.where(dec > 0, 1.0 / dec, torch.zeros_like(dec))
    q = round_to_format((xb * inv).clamp(-_E2M1_MAX, _E2M1_MAX), "e2m1")
    return (q * dec).flatten(-2).to(x.dtype)


def fp8_activation_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 E4M3: s_t = amax_t / 448, x ≈ e4m3(x / s_t) · s_t (zero rows stay zero)."""
    xf = x.to(torch.float32)
    s = xf.abs().amax(-1, keepdim=True) / _E4M3_MAX
    q = round_to_format(torch.where(s > 0, xf / torch.where(s > 0, s, 1.0), 0.0), "e4m3")
    return (q * s).to(x.dtype)


class _ExpertInputs:
    """An Experts `gemm_quantizer`: looks up which expert's weight a GEMM gets and runs `fn` on its input."""

    def __init__(self, experts: Experts, fqn: str, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.names = {}
        for p in EXPERT_PROJS:
            for e, w in enumerate(getattr(experts, p).unbind(0)):
                self.names[w.data_ptr()] = expert_module(fqn, e, p)

    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fn(self.names[w.data_ptr()], x), w)


def _install(model: nn.Module, modules: set[str], fn: Callable[[str, torch.Tensor], torch.Tensor]) -> list:
    """Run fn(module name, input) on the input of every listed GEMM (Linear hooks, expert gemm_quantizers)."""
    handles = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, Experts) and any(m.startswith(f"{fqn}.") for m in modules):
            mod.gemm_quantizer = _ExpertInputs(mod, fqn, lambda n, x: fn(n, x) if n in modules else x)
            handles.append(mod)
        elif type(mod) is nn.Linear and fqn in modules:
            handles.append(mod.register_forward_pre_hook(lambda m, args, n=fqn: (fn(n, args[0]),)))
    return handles


def _uninstall(handles: list) -> None:
    for h in handles:
        if isinstance(h, Experts):
            h.__dict__.pop("gemm_quantizer", None)
        else:
            h.remove()


def emulate_activations(model: nn.Module, scheme: str, input_scales: dict[str, torch.Tensor],
                        modules: set[str]) -> None:
    """Quantize the inputs of the quantized layers as the scheme's activations are (nvfp4: static global
    scale per layer; fp8: dynamic per token), from now on."""
    if scheme == "nvfp4":
        missing = sorted(modules - set(input_scales))
        if missing:
            raise CheckpointError(f"nvfp4 checkpoint lacks input_global_scale for {missing[:4]}")
        _install(model, modules, lambda n, x: nvfp4_activation_fake_quantize(x, input_scales[n]))
    elif scheme == "fp8":
        _install(model, modules, lambda n, x: fp8_activation_fake_quantize(x))


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], modules: set[str]) -> dict[str, torch.Tensor]:
    """amax (fp32 0-dim) of the input of every listed GEMM over `batches` of token ids (B, T). A routed expert
    that received no token takes the largest amax of its layer's experts of the same projection."""
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            a = x.detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return x

    dev = next(model.parameters()).device
    handles = _install(model, modules, record)
    try:
        for ids in batches:
            model(ids.to(dev))
    finally:
        _uninstall(handles)
    for name in modules - set(amax):
        layer, _, proj = name.rpartition(".")
        prefix = layer.rsplit(".", 1)[0]
        peers = [v for k, v in amax.items() if k.startswith(f"{prefix}.") and k.endswith(f".{proj}")]
        amax[name] = torch.stack(peers).max() if peers else torch.zeros((), device=dev)
    return amax


def input_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """448·6 / amax in fp32 (1 for a zero amax), shape [1]: the encode-form scale compressed-tensors stores."""
    return te_global_scales(amax)[0].reshape(1)
