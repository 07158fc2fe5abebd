"""Quantized checkpoints: which weights are quantized, their tensors on disk, and reading them back.

Schemes (docs/low-precision.md §7):

    scheme        on disk, per quantized weight W (out, in)                       config.json
    nvfp4         weight_packed uint8 (out, in/2), weight_scale e4m3 (out, in/16),  compressed-tensors
                  weight_global_scale fp32 [1], input_global_scale fp32 [1]         nvfp4-pack-quantized
    nvfp4-w4a16   the same without input_global_scale                              compressed-tensors
    fp8           weight e4m3 (out, in), weight_scale fp32 (out, 1)                compressed-tensors
                  (activations: dynamic per token, nothing stored)                  float-quantized
    mx9/mx6/mx4   weight_exponents, weight_micro, weight_codes (mx_shared)          nemotron3
    mxfp4         weight_packed uint8 (out, in/2), weight_scale E8M0 bytes (out, in/32)  nemotron3
    seedlm4/3     weight_seeds int16, weight_codes, weight_exps uint8, weight_etop int8 [1]  nemotron3

Which weights: `EXPORT_POLICY`, the precision policy of the training recipe (`convert.PrecisionPolicy.choose`)
with the post-training choices of Super's released checkpoints: attention q/k/v/o, the latent projections, the
routers (Parameters, never quantized), MTP, embeddings and lm_head stay in the checkpoint's precision and are
listed in `ignore`; every other GEMM weight is quantized (Mamba in/out projections, routed and shared experts,
dense MLPs), without the pretraining recipe's high-precision tail of layers. A weight whose input width is not
a multiple of the scheme's block stays high too, and is reported.

NVFP4 arithmetic. Codes and block scales are those of the `te` convention (`nvfp4.nvfp4_quantize`), whose
encode-form global scale S_enc = 448·6 / amax is exactly what compressed-tensors stores as
`weight_global_scale`. Decoding follows compressed-tensors (and vLLM, which inverts the global scales):
W = e2m1(code) · (fp32(weight_scale) / weight_global_scale), in fp32; that is what `decode_weight` computes, so a
loaded model multiplies with the weights those tools decode (compressed-tensors then rounds to its dtype).
`input_global_scale` = 448·6 / amax of the layer's input over a calibration pass (an expert that saw no
calibration token takes its layer's largest). FP8: per output channel s = amax / 448 (1 for an all-zero row),
W = e4m3(W / s) · s.

Activation emulation and calibration are in quant/activations.py (re-exported here). The folder side (files,
the table of layouts by `quant_method`, loading) is nemotron3/checkpoint/; this module only encodes and decodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from nemotron3.hf import EXPERT_PROJS, CheckpointError, expert_module
from nemotron3.model.moe import Experts
from nemotron3.quant.activations import (
    calibrate,
    emulate_activations,
    fp8_activation_fake_quantize,
    input_global_scale,
    nvfp4_activation_fake_quantize,
)
from nemotron3.quant.convert import PrecisionPolicy
from nemotron3.quant.fp_codecs import decode
from nemotron3.quant.mx import MXQuantized, mx_quantize
from nemotron3.quant.mx_shared import MXS_FORMATS, MXSQuantized, mxs_quantize
from nemotron3.quant.nvfp4 import nvfp4_quantize, te_global_scales
from nemotron3.quant.packed import PackedWeight
from nemotron3.quant.seedlm import SEEDLM_SPECS, SeedLMQuantized, SeedLMSpec, seedlm_quantize

__all__ = ["SCHEMES", "CT_SCHEMES", "EXPORT_POLICY", "BLOCK", "bits_per_weight", "plan", "encode_weight",
           "decode_weight", "quantization_config", "scheme_of", "read", "PACKED_LAYOUT", "calibrate",
           "input_global_scale", "emulate_activations", "nvfp4_activation_fake_quantize",
           "fp8_activation_fake_quantize"]

SCHEMES = ("nvfp4", "nvfp4-w4a16", "fp8", "mx9", "mx6", "mx4", "mxfp4", "seedlm4", "seedlm3")
CT_SCHEMES = ("nvfp4", "nvfp4-w4a16", "fp8")           # written in the compressed-tensors format
BLOCK = {"nvfp4": 16, "nvfp4-w4a16": 16, "fp8": 1, "mx9": 16, "mx6": 16, "mx4": 16, "mxfp4": 32,
         "seedlm4": 1, "seedlm3": 1}                  # the input width must be a multiple of this
EXPORT_POLICY = PrecisionPolicy(high_precision_tail=0.0, mamba_out_proj="nvfp4")
_E4M3_MAX = 448.0
_OWN_METHOD = "nemotron3"


def bits_per_weight(scheme: str) -> float:
    """Bits per quantized weight, scales included (per-tensor and per-channel scales excluded)."""
    if scheme in ("nvfp4", "nvfp4-w4a16"):
        return 4 + 8 / 16
    if scheme == "fp8":
        return 8.0
    if scheme in MXS_FORMATS:
        return MXS_FORMATS[scheme] + 2.0
    if scheme == "mxfp4":
        return 4 + 8 / 32
    return SEEDLM_SPECS[scheme].bits_per_weight


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def plan(model: nn.Module, scheme: str) -> tuple[dict[str, tuple[int, ...]], list[str], list[str]]:
    """(disk name of each weight to quantize -> shape, modules kept high (`ignore`), modules kept high only
    because their input width is not a multiple of the scheme's block). Module names are disk names without
    `.weight`; a routed expert's projections are modules `...experts.E.up_proj` / `.down_proj`."""
    _check_scheme(scheme)
    n_layers = len(model.backbone.layers)
    quant: dict[str, tuple[int, ...]] = {}
    ignore: list[str] = []
    misfit: list[str] = []
    for fqn, mod in model.named_modules():
        if isinstance(mod, Experts):
            mods = [(expert_module(fqn, e, p), tuple(getattr(mod, p).shape[1:]))
                    for e in range(mod.num_experts) for p in EXPERT_PROJS]
            kind = EXPORT_POLICY.choose(fqn, n_layers)
        elif type(mod) is nn.Linear:
            mods = [(fqn, tuple(mod.weight.shape))]
            kind = EXPORT_POLICY.choose(fqn, n_layers, fqn.endswith("out_proj") and hasattr(
                model.get_submodule(fqn.rsplit(".", 1)[0]), "A_log"))
        else:
            continue
        for name, shape in mods:
            if kind == "high":
                ignore.append(name)
            elif shape[-1] % BLOCK[scheme]:
                ignore.append(name)
                misfit.append(name)
            else:
                quant[f"{name}.weight"] = shape
    return quant, ignore, misfit


# ------------------------------------------------------------------------------------------ tensors of one weight


def encode_weight(scheme: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The disk tensors of one weight (out, in), keyed by suffix (`weight_packed`, ...)."""
    w = w.detach().to(torch.float32)
    if scheme in ("nvfp4", "nvfp4-w4a16"):
        lo, hi = torch.aminmax(w)
        amax = torch.maximum(-lo, hi)
        s_enc, _ = te_global_scales(amax)
        q = nvfp4_quantize(w, amax=amax)
        return {"weight_packed": q.packed, "weight_scale": q.scales, "weight_global_scale": s_enc.reshape(1)}
    if scheme == "fp8":
        amax = w.abs().amax(-1, keepdim=True)
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / _E4M3_MAX)
        return {"weight": (w / scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn), "weight_scale": scale}
    if scheme in MXS_FORMATS:
        q = mxs_quantize(w, scheme)
        return {"weight_exponents": q.exponents, "weight_micro": q.micro, "weight_codes": q.codes}
    if scheme == "mxfp4":
        m = mx_quantize(w, "fp4_e2m1", mode="floor")
        return {"weight_packed": m.qdata, "weight_scale": m.scales.view(torch.uint8)}
    s = seedlm_quantize(w, SEEDLM_SPECS[scheme])
    return {"weight_seeds": s.seeds, "weight_codes": s.codes, "weight_exps": s.exps,
            "weight_etop": torch.tensor([s.e_top], dtype=torch.int8, device=s.seeds.device)}


def decode_weight(scheme: str, t: dict[str, torch.Tensor], shape: tuple[int, ...],
                  spec: SeedLMSpec | None = None) -> torch.Tensor:
    """The fp32 weight the disk tensors of one weight decode to (see the module docstring)."""
    if scheme in ("nvfp4", "nvfp4-w4a16"):
        packed = t["weight_packed"]
        codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)                  # (out, in)
        vals = decode(codes, "e2m1").unflatten(-1, (-1, 16))
        scale = t["weight_scale"].to(torch.float32) / t["weight_global_scale"].to(torch.float32)
        return (vals * scale.unsqueeze(-1)).flatten(-2)
    if scheme == "fp8":
        return t["weight"].to(torch.float32) * t["weight_scale"].to(torch.float32)
    if scheme in MXS_FORMATS:
        return MXSQuantized(t["weight_exponents"], t["weight_micro"], t["weight_codes"], scheme).dequantize()
    if scheme == "mxfp4":
        return MXQuantized(t["weight_packed"], t["weight_scale"].view(torch.float8_e8m0fnu), "fp4_e2m1").dequantize()
    q = SeedLMQuantized(t["weight_seeds"], t["weight_codes"], t["weight_exps"], int(t["weight_etop"][0]), shape,
                        spec or SEEDLM_SPECS[scheme])
    return q.dequantize()


# ------------------------------------------------------------------------------------------ config.json


def quantization_config(scheme: str, ignore: list[str]) -> dict:
    """The `quantization_config` of config.json: compressed-tensors' own model for nvfp4 / nvfp4-w4a16 / fp8
    (the dict `QuantizationConfig(...).model_dump()` gives, so compressed-tensors and vLLM read it), ours else."""
    _check_scheme(scheme)
    if scheme in CT_SCHEMES:
        if scheme == "fp8":
            weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
                       "dynamic": False}
            inputs = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                      "dynamic": True}
        else:
            weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16,
                       "strategy": "tensor_group", "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
            inputs = None if scheme == "nvfp4-w4a16" else {**weights, "dynamic": "local", "observer": "static_minmax"}
        return {
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                          "output_activations": None, "format": None}},
            "quant_method": "compressed-tensors", "kv_cache_scheme": None,
            "format": "float-quantized" if scheme == "fp8" else "nvfp4-pack-quantized",
            "quantization_status": "compressed", "global_compression_ratio": None, "ignore": _both_spellings(ignore),
            "moe_sparsity_config": None,
        }
    out = {"quant_method": _OWN_METHOD, "scheme": scheme, "bits_per_weight": bits_per_weight(scheme),
           "block_size": BLOCK[scheme], "ignore": ignore}
    if scheme in SEEDLM_SPECS:
        out["seedlm"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(SEEDLM_SPECS[scheme]).items()}
    return out


def _both_spellings(ignore: list[str]) -> list[str]:
    """The ignored modules under their checkpoint names (`backbone.…`, which vLLM maps itself) and under the names
    transformers' NemotronH gives the modules in memory (`model.…`), which its compressed-tensors loader matches."""
    return ignore + [f"model.{n.removeprefix('backbone.')}" for n in ignore if n.startswith("backbone.")]


def scheme_of(qc: dict) -> str:
    """The scheme a `quantization_config` describes; CheckpointError for one we do not read."""
    method = qc.get("quant_method")
    if method == _OWN_METHOD:
        scheme = qc.get("scheme")
        if scheme in SCHEMES:
            return scheme
    elif method == "compressed-tensors":
        fmt = qc.get("format")
        groups = list((qc.get("config_groups") or {}).values())
        if fmt == "float-quantized":
            return "fp8"
        if fmt == "nvfp4-pack-quantized" and groups:
            return "nvfp4" if groups[0].get("input_activations") else "nvfp4-w4a16"
    raise CheckpointError(f"unsupported quantization_config (quant_method {method!r}, format "
                          f"{qc.get('format', qc.get('scheme'))!r}); nemotron3 reads {', '.join(SCHEMES)}")


_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "weight_exponents",
             "weight_micro", "weight_codes", "weight_seeds", "weight_exps", "weight_etop")
# the schemes whose weights stay packed at runtime (quant/packed.py): their tensors per weight, split into those
# that lead with the weight's rows and the per-tensor scales; SeedLM's seeds are decoded on load
PACKED_LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "nvfp4": (("weight_packed", "weight_scale"), ("weight_global_scale",)),
    "nvfp4-w4a16": (("weight_packed", "weight_scale"), ("weight_global_scale",)),
    "fp8": (("weight", "weight_scale"), ()),
    "mx9": (("weight_exponents", "weight_micro", "weight_codes"), ()),
    "mx6": (("weight_exponents", "weight_micro", "weight_codes"), ()),
    "mx4": (("weight_exponents", "weight_micro", "weight_codes"), ()),
    "mxfp4": (("weight_packed", "weight_scale"), ()),
}


def _packed(scheme: str, t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> PackedWeight:
    rows, shared = PACKED_LAYOUT[scheme]
    return PackedWeight(scheme, {k: t[k] for k in rows}, {k: t[k].reshape(1) for k in shared}, shape,
                        lambda parts: decode_weight(scheme, parts, ()))


def read(scheme: str, qc: dict, keys: list[str], get: Callable[[str], torch.Tensor],
         shapes: dict[str, tuple[int, ...]], file_of: Callable[[str], str], pack: bool
         ) -> tuple[dict[str, torch.Tensor], dict[str, PackedWeight], Callable[[nn.Module], None] | None]:
    """The decoder of compressed-tensors and nemotron3 folders (nemotron3/checkpoint/schemes.py calls it): the
    tensors `keys` (read with `get`) as (dense tensors by disk name, weights kept packed by disk name, the hook
    that emulates the scheme's activations or None). Every quantized module's tensors are checked against the
    shape of its weight in `shapes` (CheckpointError naming `file_of(tensor)` and the tensor); `pack` keeps the
    weights of a packable scheme (`PACKED_LAYOUT`) as stored instead of decoding them to fp32."""
    spec = None
    if scheme in SEEDLM_SPECS and isinstance(qc.get("seedlm"), dict):
        raw = qc["seedlm"]
        spec = SeedLMSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    quantized_modules = {k.rsplit(".", 1)[0] for k in keys if k.endswith((".weight_packed", ".weight_codes"))
                         or (scheme == "fp8" and k.endswith(".weight_scale"))}
    for k in keys:
        module, _, suffix = k.rpartition(".")
        if module in quantized_modules and (suffix in _SUFFIXES or suffix == "weight"):
            groups.setdefault(module, {})[suffix] = get(k)
        else:
            plain[k] = get(k)
    input_scales: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    for module, t in groups.items():
        name = f"{module}.weight"
        if name not in shapes:
            raise CheckpointError(f"{file_of(next(f'{module}.{s}' for s in t))}: quantized tensors for {module}, "
                                  "which the model does not have")
        _check_shapes(scheme, module, t, shapes[name], file_of)
        try:
            if pack and scheme in PACKED_LAYOUT:
                packed[name] = _packed(scheme, t, shapes[name])
                decoded_shape = shapes[name]
            else:
                plain[name] = decode_weight(scheme, t, shapes[name], spec)
                decoded_shape = tuple(plain[name].shape)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file_of(name)}: cannot decode the {scheme} tensors of {module}: {e!r}") from e
        if decoded_shape != shapes[name]:
            raise CheckpointError(f"{file_of(name)}: {module} decodes to shape {list(decoded_shape)}, the config "
                                  f"needs {list(shapes[name])}")
        if "input_global_scale" in t:
            input_scales[module] = t["input_global_scale"]
    if scheme not in ("nvfp4", "fp8"):
        return plain, packed, None
    return plain, packed, lambda model: emulate_activations(model, scheme, input_scales, set(groups))


def _check_shapes(scheme: str, module: str, t: dict[str, torch.Tensor], shape: tuple[int, ...],
                  file_of: Callable[[str], str]) -> None:
    """Each stored tensor of a packable scheme has the shape its weight (out, in) implies: one line naming the file
    and the tensor otherwise (a wrong scale shape would otherwise broadcast, or fail deep inside a matmul)."""
    if scheme not in PACKED_LAYOUT or len(shape) != 2:
        return
    out, inp = shape
    want: dict[str, tuple[int, ...]]
    if scheme in ("nvfp4", "nvfp4-w4a16"):
        want = {"weight_packed": (out, inp // 2), "weight_scale": (out, inp // 16), "weight_global_scale": (1,)}
        if "input_global_scale" in t:
            want["input_global_scale"] = (1,)
    elif scheme == "fp8":
        want = {"weight": (out, inp), "weight_scale": (out, 1)}
    elif scheme == "mxfp4":
        want = {"weight_packed": (out, inp // 2), "weight_scale": (out, inp // 32)}
    else:
        nblk = inp // 16
        want = {"weight_exponents": (out, nblk), "weight_micro": (out, nblk),
                "weight_codes": (out, nblk * 2 * (MXS_FORMATS[scheme] + 1))}
    for suffix, shp in want.items():
        name = f"{module}.{suffix}"
        if suffix not in t:
            raise CheckpointError(f"{file_of(f'{module}.weight')}: {scheme} module {module} has no {suffix} tensor")
        if tuple(t[suffix].shape) != shp:
            raise CheckpointError(f"{file_of(name)}: tensor {name} has shape {list(t[suffix].shape)}, but {scheme} "
                                  f"needs {list(shp)} for a weight of shape {list(shape)}")
