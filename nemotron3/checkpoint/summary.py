"""What a checkpoint folder holds, from its config and the safetensors headers only (any size): the quantization
scheme in words (`describe`) and parameters, bytes on disk and bytes resident once loaded per layer type
(`layer_bytes`; `nemotron3 info DIR`)."""

from __future__ import annotations

import math
import os

import torch

from nemotron3.checkpoint.files import quantization_config, quantization_source, read_config, tensor_headers
from nemotron3.hf import state_dict_for_disk
from nemotron3.model.hybrid import HybridLM
from nemotron3.quant import modelopt
from nemotron3.quant.checkpoint import PACKED_LAYOUT, bits_per_weight, scheme_of

_TYPES = (  # (layer type, test on the module name), the first match wins
    ("embeddings", lambda n: n.startswith("backbone.embeddings")),
    ("lm_head", lambda n: n.startswith("lm_head")),
    ("mtp", lambda n: n.startswith("mtp.")),
    ("routed experts", lambda n: ".experts." in n),
    ("shared experts", lambda n: ".shared_experts." in n),
    ("latent projections", lambda n: "_latent_proj" in n),
    ("router", lambda n: ".gate." in n),
    ("attention", lambda n: any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj", "o_proj"))),
    ("mamba projections", lambda n: ".in_proj." in n or (".out_proj." in n)),
    ("dense mlp", lambda n: ".up_proj." in n or ".down_proj." in n),
    ("norms, conv, SSM parameters", lambda n: True),
)
_DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8"}
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8}
_NOT_LOADED = ("input_global_scale", "input_scale", "k_scale", "v_scale")  # read, checked, not held by a packed model


def describe(folder: str | os.PathLike) -> str:
    """'nvfp4, 4.5 bits per quantized weight', 'modelopt MIXED_PRECISION (FP8, NVFP4)', or 'not quantized'."""
    qc = quantization_config(folder)
    if qc is None:
        return "not quantized"
    if modelopt.is_modelopt(qc):
        algo, _, layers = modelopt.settings(qc, str(quantization_source(folder, qc)))
        per_layer = sorted({str(v["quant_algo"]).upper() for v in layers.values()})
        return f"modelopt {algo}" + (f" ({', '.join(per_layer)})" if per_layer else "")
    scheme = scheme_of(qc)
    return f"{scheme}, {bits_per_weight(scheme):g} bits per quantized weight"


def layer_bytes(folder: str | os.PathLike) -> list[dict]:
    """Per layer type: {"type", "precision", "params", "bytes", "resident"}: parameters from the config, bytes and
    dtypes from the safetensors headers (a quantized weight's tensors count towards its layer), and the bytes
    `load(folder)` holds: a packed weight's stored tensors (quant/packed.py), fp32 for a quantized weight decoded
    on load (SeedLM), the stored tensor otherwise."""
    qc = quantization_config(folder)
    mo = modelopt.settings(qc, str(quantization_source(folder, qc))) if qc and modelopt.is_modelopt(qc) else None
    scheme = scheme_of(qc) if qc is not None and mo is None else None
    with torch.device("meta"):
        model = HybridLM(read_config(folder))
    params = {name: t.numel() for name, t in state_dict_for_disk(model)}
    rows: dict[str, dict] = {}

    def row(name: str) -> dict:
        kind = next(t for t, test in _TYPES if test(name))
        return rows.setdefault(kind, {"type": kind, "precision": set(), "params": 0, "bytes": 0, "resident": 0})

    for name, n in params.items():
        row(name)["params"] += n
    headers = {k: (dtype, math.prod(shape)) for k, (dtype, shape) in tensor_headers(folder).items()}
    quantized = {k.rpartition(".")[0] for k in headers if k.endswith(("weight_packed", "weight_codes",
                                                                          "weight_exponents", "weight_seeds"))
                 or (scheme == "fp8" and k.endswith(".weight_scale"))}
    decoded: set[str] = set()
    for k, (dtype, numel) in headers.items():
        module, _, suffix = k.rpartition(".")
        owner = k if k in params else f"{module}.weight"
        r = row(owner)
        stored = numel * _DTYPE_BYTES.get(dtype, 4)
        r["bytes"] += stored
        algo = modelopt.layer_algo(module, *mo) if mo is not None and module.rsplit(".", 1)[-1] in \
            modelopt.GEMM_LEAVES else None
        if algo is not None or module in quantized:
            r["precision"].add(algo.lower() if algo else scheme)
            if algo is not None or scheme in PACKED_LAYOUT:
                r["resident"] += 0 if suffix in _NOT_LOADED else stored
            elif owner not in decoded:
                decoded.add(owner)
                r["resident"] += params.get(owner, 0) * 4
        else:
            if owner == k and k.endswith(".weight"):
                r["precision"].add(_DTYPE_NAMES.get(dtype, dtype.lower()))
            r["resident"] += 0 if suffix in ("k_scale", "v_scale") else stored
    for r in rows.values():
        r["precision"] = " + ".join(sorted(r["precision"])) or "-"
    return [r for r in rows.values() if r["params"]]
