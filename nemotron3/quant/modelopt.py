"""NVIDIA ModelOpt checkpoints (`quant_method: "modelopt"`): the layout of NVIDIA's NVFP4 / FP8 releases.

Where the settings live (field names as vLLM's `ModelOptQuantConfigBase.from_config` reads them):

    config.json  quantization_config = {"quant_method": "modelopt", "quant_algo": ..., "ignore": [...],
                                        "group_size": 16, "kv_cache_scheme": {...}, "quantized_layers": {...},
                                        "config_groups": {...}, "producer": {...}}
    hf_quant_config.json (older exports) = {"producer": {...}, "quantization": {"quant_algo": ...,
                                        "kv_cache_quant_algo": ..., "group_size": 16, "exclude_modules": [...],
                                        "quantized_layers": {...}}}

`quant_algo` is one algorithm for every quantized GEMM, or "MIXED_PRECISION" with a per-module algorithm in
`quantized_layers` (a key names a module, or a parent of modules: `...mixer.experts` covers every expert);
a module in neither stays high precision. `ignore` / `exclude_modules` are fnmatch wildcards over module
names (`lm_head`, `backbone.layers.3.mixer.q_proj`, `mtp*`); names may use transformers' in-memory `model.`
prefix for the disk's `backbone.`. Tensors per quantized module X (vLLM's ModelOpt linear methods):

    algo                         X.weight                     X.weight_scale             X.weight_scale_2  X.input_scale
    NVFP4, W4A16_NVFP4           uint8 (out, in/2) E2M1 pairs e4m3 (out, in/16)          fp32 scalar       fp32 scalar
    FP8                          float8_e4m3fn (out, in)      fp32 scalar (per tensor)   -                 fp32 scalar
    FP8_PER_CHANNEL_PER_TOKEN    float8_e4m3fn (out, in)      fp32 (out,) per channel    -                 -

Decoding, in fp32: NVFP4 W = e2m1(code) · (weight_scale_2 · fp32(weight_scale)), ModelOpt's decode-form global
scale (amax / (6·448)) multiplied, exactly our `NVFP4Quantized.dequantize` with S_dec = weight_scale_2 (vLLM
hands weight_scale_2 to its W4A16 kernel without inverting it; compressed-tensors stores the inverse and
divides); FP8 W = fp32(weight) · weight_scale, our FP8 decoder. `input_scale` (static activation scales) is
checked and kept out of the model: ModelOpt folders load weight-only, activations in the model's dtype. The
FP8 KV-cache scales (`k_proj.k_scale`, `v_proj.v_scale`) are dropped: the cache stays in the model's dtype.
Algorithms read here: NVFP4, W4A16_NVFP4, FP8, FP8_PER_CHANNEL_PER_TOKEN (and MIXED_PRECISION of them); any
other (FP8_PB_WO, MXFP8, NVFP4_AWQ, W4A8_*) is refused in one line naming the config file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatch

import torch

from nemotron3.hf import CheckpointError
from nemotron3.quant.nvfp4 import NVFP4Quantized
from nemotron3.quant.packed import PackedWeight

__all__ = ["ALGOS", "is_modelopt", "settings", "layer_algo", "decode_nvfp4", "decode_fp8", "read", "GEMM_LEAVES"]

ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8", "FP8_PER_CHANNEL_PER_TOKEN")
MIXED = "MIXED_PRECISION"
GEMM_LEAVES = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
               "fc1_latent_proj", "fc2_latent_proj", "lm_head")
_DROPPED = ("k_scale", "v_scale")                      # FP8 KV-cache scales
_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
_GROUP = 16


def is_modelopt(qc: dict) -> bool:
    return str(qc.get("quant_method", "")).lower().startswith("modelopt") or isinstance(qc.get("quantization"), dict)


def settings(qc: dict, source: str) -> tuple[str, list[str], dict[str, dict]]:
    """(quant_algo upper-cased, exclusion wildcards, quantized_layers) of either spelling of the config."""
    inner = qc["quantization"] if isinstance(qc.get("quantization"), dict) else qc
    algo = str(inner.get("quant_algo") or "").upper()
    exclude = inner.get("exclude_modules", inner.get("ignore", qc.get("ignore", []))) or []
    layers = inner.get("quantized_layers") or {}
    group = inner.get("group_size")
    if algo != MIXED and algo not in ALGOS:
        raise CheckpointError(f"{source}: ModelOpt quant_algo {inner.get('quant_algo')!r} is not read by nemotron3; "
                              f"it reads {', '.join((*ALGOS, MIXED))}")
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise CheckpointError(f"{source}: ModelOpt exclude_modules / ignore must be a list of module names")
    if not isinstance(layers, dict) or (algo == MIXED and not layers):
        raise CheckpointError(f"{source}: ModelOpt MIXED_PRECISION needs a non-empty quantized_layers mapping")
    for name, spec in layers.items():
        la = str(spec.get("quant_algo", "")).upper() if isinstance(spec, dict) else ""
        if la not in ALGOS:
            raise CheckpointError(f"{source}: quantized_layers[{name!r}] has quant_algo "
                                  f"{spec.get('quant_algo') if isinstance(spec, dict) else spec!r}; nemotron3 reads "
                                  f"{', '.join(ALGOS)}")
        if "NVFP4" in la and spec.get("group_size", _GROUP) != _GROUP:
            raise CheckpointError(f"{source}: quantized_layers[{name!r}] has group_size {spec['group_size']}; "
                                  f"NVFP4 blocks are {_GROUP}")
    if "NVFP4" in algo and group not in (None, _GROUP):
        raise CheckpointError(f"{source}: ModelOpt NVFP4 group_size {group}; NVFP4 blocks are {_GROUP}")
    return algo, exclude, layers


def _spellings(module: str) -> tuple[str, ...]:
    """The module's disk name and transformers' in-memory one (`backbone.` -> `model.`)."""
    if module.startswith("backbone."):
        return module, "model." + module.removeprefix("backbone.")
    return (module,)


def layer_algo(module: str, algo: str, exclude: list[str], layers: dict[str, dict]) -> str | None:
    """The algorithm a GEMM module is stored in, or None for high precision."""
    names = _spellings(module)
    if any(fnmatch(n, pat) or n == pat or n.startswith(pat + ".") for n in names for pat in exclude):
        return None
    for n in names:
        if n in layers:
            return str(layers[n]["quant_algo"]).upper()
    for key, spec in layers.items():
        if any(n.startswith(key + ".") for n in names):
            return str(spec["quant_algo"]).upper()
    if algo == MIXED:
        return None
    return algo if module.rsplit(".", 1)[-1] in GEMM_LEAVES else None


def decode_nvfp4(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 weight of ModelOpt NVFP4 tensors: our NVFP4 decoder with S_dec = weight_scale_2."""
    s_dec = t["weight_scale_2"].to(torch.float32).reshape(())
    return NVFP4Quantized(t["weight"], t["weight_scale"], s_dec).dequantize()


def decode_fp8(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 weight of ModelOpt FP8 tensors (per-tensor scale (1,) or per-channel (rows, 1))."""
    return t["weight"].to(torch.float32) * t["weight_scale"].to(torch.float32)


def _expect(file: str, name: str, t: torch.Tensor, dtype: torch.dtype, shapes: Iterable[tuple[int, ...]],
            algo: str) -> None:
    shapes = list(shapes)
    if t.dtype != dtype or tuple(t.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise CheckpointError(f"{file}: tensor {name} is {t.dtype} {list(t.shape)}, but ModelOpt {algo} needs "
                              f"{dtype} {want}")


def _check(algo: str, module: str, t: dict[str, torch.Tensor], shape: tuple[int, ...],
           file_of: Callable[[str], str]) -> PackedWeight:
    """Validate one module's tensors against its algorithm; its packed form (scalars reshaped to (1,))."""
    out, inp = shape
    for need in ("weight", "weight_scale", *(("weight_scale_2",) if "NVFP4" in algo else ())):
        if need not in t:
            raise CheckpointError(f"{file_of(module + '.weight')}: ModelOpt {algo} module {module} has no {need} "
                                  "tensor")
    name = f"{module}.%s"
    scalar = [(), (1,)]
    if "NVFP4" in algo:
        if inp % _GROUP:
            raise CheckpointError(f"{file_of(name % 'weight')}: {module} has input width {inp}, not a multiple of "
                                  f"{_GROUP}, so it cannot be NVFP4")
        _expect(file_of(name % "weight"), name % "weight", t["weight"], torch.uint8, [(out, inp // 2)], algo)
        _expect(file_of(name % "weight_scale"), name % "weight_scale", t["weight_scale"], torch.float8_e4m3fn,
                [(out, inp // _GROUP)], algo)
        _expect(file_of(name % "weight_scale_2"), name % "weight_scale_2", t["weight_scale_2"], torch.float32,
                scalar, algo)
        rowwise = {"weight": t["weight"], "weight_scale": t["weight_scale"]}
        shared = {"weight_scale_2": t["weight_scale_2"].reshape(1)}
        decode = decode_nvfp4
    else:
        _expect(file_of(name % "weight"), name % "weight", t["weight"], torch.float8_e4m3fn, [(out, inp)], algo)
        per_channel = algo == "FP8_PER_CHANNEL_PER_TOKEN"
        _expect(file_of(name % "weight_scale"), name % "weight_scale", t["weight_scale"], torch.float32,
                [(out,), (out, 1)] if per_channel else scalar, algo)
        rowwise = {"weight": t["weight"]}
        shared = {}
        if per_channel:
            rowwise["weight_scale"] = t["weight_scale"].reshape(out, 1)
        else:
            shared["weight_scale"] = t["weight_scale"].reshape(1)
        decode = decode_fp8
    if "input_scale" in t:
        _expect(file_of(name % "input_scale"), name % "input_scale", t["input_scale"], torch.float32, scalar, algo)
    return PackedWeight(f"modelopt-{algo.lower()}", rowwise, shared, shape, decode)


def read(qc: dict, keys: list[str], get: Callable[[str], torch.Tensor], shapes: dict[str, tuple[int, ...]],
         file_of: Callable[[str], str], source: str, pack: bool
         ) -> tuple[dict[str, torch.Tensor], dict[str, PackedWeight]]:
    """({disk name: tensor} for everything read densely, {disk name of a weight: its packed form}): every GEMM
    module as `quantization_config` says, its tensors checked (dtype, shape) against its algorithm; a packed
    weight is kept as stored when `pack`, else decoded to fp32."""
    algo, exclude, layers = settings(qc, source)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for k in keys:
        module, _, suffix = k.rpartition(".")
        if suffix in _DROPPED:
            continue
        if suffix in _SUFFIXES or (suffix == "weight" and f"{k}" in shapes and module.rsplit(".", 1)[-1]
                                   in GEMM_LEAVES):
            groups.setdefault(module, {})[suffix] = get(k)
        else:
            plain[k] = get(k)
    packed: dict[str, PackedWeight] = {}
    for module, t in groups.items():
        weight = f"{module}.weight"
        if weight not in shapes:
            raise CheckpointError(f"{file_of(next(f'{module}.{s}' for s in t))}: quantization tensors for {module}, "
                                  "which the model does not have")
        la = layer_algo(module, algo, exclude, layers)
        if la is None:
            extra = sorted(s for s in t if s != "weight")
            if extra:
                raise CheckpointError(f"{file_of(f'{module}.{extra[0]}')}: {module}.{extra[0]} is a scale, but "
                                      f"{source} keeps {module} in high precision (excluded or not listed)")
            if "weight" in t:
                if not t["weight"].is_floating_point() or t["weight"].dtype == torch.float8_e4m3fn:
                    raise CheckpointError(f"{file_of(weight)}: tensor {weight} is {t['weight'].dtype}, but {source} "
                                          f"keeps {module} in high precision")
                plain[weight] = t["weight"]
            continue
        pw = _check(la, module, t, shapes[weight], file_of)
        if pack:
            packed[weight] = pw
        else:
            plain[weight] = pw.dequantize()
    return plain, packed

