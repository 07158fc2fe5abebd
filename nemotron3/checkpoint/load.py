"""Loading a checkpoint folder into a HybridLM, in small steps (`load`).

Strict and memory-frugal: the model is built on the meta device, every tensor is read from a memory-mapped
safetensors file, checked against the expected name, shape and kind of dtype, cast, and assigned in place
(`load_state_dict(assign=True)`). A tensor that needs no conversion stays a view into the file's mapping. The
per-expert tensors are copied into the stacked 3-D tensors (as is anything cast or moved to another device), and the
file pages they were read from are then dropped from the process (`Shard.release`): otherwise those pages would stay
resident, next to the copies, for as long as the mapping lives. So after loading, about one checkpoint's worth of
memory is resident, not two.

A quantized folder (a `quantization_config`) is first decoded by the reader its `quant_method` names
(checkpoint/schemes.py); what it decodes densely goes through the same checks, what it keeps packed is installed
once the dense weights are in.
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch

from nemotron3.checkpoint import schemes
from nemotron3.checkpoint.files import (
    WEIGHTS,
    Decoded,
    Shard,
    open_shards,
    quantization_config,
    quantization_source,
    read_config,
)
from nemotron3.config import ModelConfig
from nemotron3.hf import FP32_ALWAYS, CheckpointError, CheckpointWarning, NonFiniteWeightWarning, disk_layout
from nemotron3.model.hybrid import HybridLM

Layout = dict[str, tuple[str, int | None, tuple[int, ...]]]  # disk name -> (our name, expert or None, disk shape)


def non_finite_count(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """NaN and ±inf values in a floating-point tensor, counted `chunk` elements at a time (the bool temporary
    stays small however large the tensor); 0 for other dtypes."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        flat = flat.float()  # the float8 kinds have no isfinite of their own
    return sum(int(part.numel() - torch.isfinite(part).sum()) for part in flat.split(chunk))


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    quantize_activations: bool = False,
    strict_finite: bool = False,
    dequantize: bool = False,
) -> HybridLM:
    """Load a `nemotron_h` checkpoint folder into a HybridLM.

    dtype: cast floating tensors to this dtype (the routers' correction bias stays fp32). None keeps the
    checkpoint's dtype. device: where the weights go (default CPU). A missing, unexpected, mis-shaped or
    wrongly typed tensor, and a file that cannot be read, raise CheckpointError naming the tensor and the file.
    `mtp.*` tensors are skipped when the config has no MTP block; a config that declares MTP over a checkpoint
    without any `mtp.*` tensor (what transformers saves, as it has no MTP module) loads the backbone alone, with
    a warning.

    Quantized checkpoints (docs/low-precision.md §7) load with their weights decoded exactly as the format
    defines, then cast to `dtype`; `quantize_activations=True` also quantizes the inputs of the quantized layers
    as the scheme does. The weights of the schemes that can stay packed (NVFP4, FP8, MX9/6/4, MXFP4; ModelOpt
    NVFP4 / FP8) do: their layers become inference-only PackedLinear / PackedExperts (quant/packed.py), so resident
    weight bytes follow the format; `dequantize=True`, or `quantize_activations`, decodes them into ordinary dense
    layers instead.

    Every floating-point tensor is checked for NaN and inf as it is read (a quantized checkpoint's once decoded):
    each one that has any gets a NonFiniteWeightWarning, `PATH: TENSOR has N non-finite values`, and loads as it
    is; with `strict_finite=True` the first one is a CheckpointError with the same words instead.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    config = read_config(folder)
    device = torch.device(device or "cpu")
    quantized = None
    with ExitStack() as stack:
        shards: list[Shard] | list[Decoded] = open_shards(folder, stack)
        config = _backbone_only_without_mtp(folder, config, shards)
        with torch.device("meta"):
            model = HybridLM(config)
        expected = model.state_dict()
        layout = disk_layout(expected)
        qc = quantization_config(folder)
        if qc is not None:
            quantized = _decode(folder, qc, shards, layout, pack=not (dequantize or quantize_activations))
            shards = [Decoded(folder / WEIGHTS, quantized.dense)]
        reader = _Reader(expected, layout, dtype, device, strict_finite)
        for shard in shards:
            reader.read(shard)
    packed = set(quantized.packed) if quantized is not None else set()
    _check_complete(folder, layout, reader, packed, strict)
    _assign(folder, model, reader.tensors(), {layout[n][0] for n in packed}, strict)
    if quantized is not None:
        quantized.finish(model, dtype, device, quantize_activations)
    _materialise_buffers(model, device)
    return model.eval()


def _backbone_only_without_mtp(folder: Path, config: ModelConfig, shards: list[Shard]) -> ModelConfig:
    """transformers has no MTP module and saves none: a config that declares MTP over such a folder loads the
    backbone, with a warning (issued at load's caller)."""
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for s in shards for k in s.keys):
        warnings.warn(
            f"{folder}: config declares {config.num_nextn_predict_layers} MTP block(s) but the checkpoint has no "
            "mtp.* tensors; loading the model without MTP", CheckpointWarning, stacklevel=3)
        return config.replace(num_nextn_predict_layers=0)
    return config


def _decode(folder: Path, qc: dict, shards: list[Shard], layout: Layout, pack: bool) -> schemes.Quantized:
    """A quantized folder's tensors through the reader of its quant_method (checkpoint/schemes.py)."""
    owner = {k: s for s in shards for k in s.keys}
    return schemes.read(qc, quantization_source(folder, qc), list(owner), lambda k: owner[k].get(k),
                        {k: v[2] for k, v in layout.items()}, {k: s.file for k, s in owner.items()}, pack)


class _Reader:
    """Reads, checks and places each tensor of the shards: plain tensors as they are (cast and moved if asked),
    per-expert ones into the preallocated 3-D stacks."""

    def __init__(self, expected: dict[str, torch.Tensor], layout: Layout, dtype: torch.dtype | None,
                 device: torch.device, strict_finite: bool) -> None:
        self.expected, self.layout, self.dtype, self.device = expected, layout, dtype, device
        self.strict_finite = strict_finite
        self.has_mtp = any(n.startswith("mtp.") for n in expected)
        self.loaded: dict[str, torch.Tensor] = {}
        self.stacked: dict[str, torch.Tensor] = {}  # our 3-D expert tensors, filled one expert at a time
        self.filled: dict[str, set[int]] = {}
        self.where: dict[str, Path] = {}  # disk name -> the file it came from
        self.unexpected: list[str] = []

    def read(self, shard: Shard | Decoded) -> None:
        for disk_name in shard.keys:
            if disk_name in self.where:
                raise CheckpointError(f"tensor {disk_name} is in both {self.where[disk_name]} and {shard.file}")
            self.where[disk_name] = shard.file
            if disk_name not in self.layout:
                if not (disk_name.startswith("mtp.") and not self.has_mtp):
                    self.unexpected.append(disk_name)
                continue
            self._one(shard, disk_name)

    def _one(self, shard: Shard | Decoded, disk_name: str) -> None:
        ours, expert, shape = self.layout[disk_name]
        got = shard.shape(disk_name)
        if got != shape:
            raise CheckpointError(f"tensor {disk_name} in {shard.file.name} has shape {list(got)}, but the "
                                  f"config needs {list(shape)}")
        t = shard.get(disk_name)
        self._check_finite(shard, disk_name, t)
        want = self.expected[ours]
        if t.is_floating_point() != want.is_floating_point():
            kind = "a floating-point" if want.is_floating_point() else "an integer"
            raise CheckpointError(f"tensor {disk_name} in {shard.file.name} has dtype {t.dtype}, but the "
                                  f"model needs {kind} tensor")
        target = t.dtype
        if t.is_floating_point():
            target = torch.float32 if ours.endswith(FP32_ALWAYS) else (self.dtype or t.dtype)
        if expert is None:
            out = t.to(device=self.device, dtype=target)
            if out is not t:
                shard.release(t)
            self.loaded[ours] = out
            return
        if ours not in self.stacked:
            self.stacked[ours] = torch.empty((want.shape[0], *shape), dtype=target, device=self.device)
            self.filled[ours] = set()
        elif self.dtype is None and target != self.stacked[ours].dtype:
            raise CheckpointError(f"tensor {disk_name} in {shard.file.name} has dtype {t.dtype}, but the other "
                                  f"experts of {ours} are {self.stacked[ours].dtype}")
        self.stacked[ours][expert].copy_(t)
        shard.release(t)
        self.filled[ours].add(expert)

    def _check_finite(self, shard: Shard | Decoded, disk_name: str, t: torch.Tensor) -> None:
        bad = non_finite_count(t)
        if bad:
            msg = f"{shard.file}: {disk_name} has {bad} non-finite value{'s' if bad > 1 else ''}"
            if self.strict_finite:
                raise CheckpointError(f"{msg}; refusing the checkpoint (strict_finite, --strict-finite)")
            # issued from here (stacklevel 1): a checkpoint loaded twice in one process is reported once
            warnings.warn(msg, NonFiniteWeightWarning, stacklevel=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything read, with each expert stack whose experts were all found."""
        out = dict(self.loaded)
        for ours, experts in self.stacked.items():
            if len(self.filled[ours]) == experts.shape[0]:
                out[ours] = experts
        return out


def _check_complete(folder: Path, layout: Layout, reader: _Reader, packed: set[str], strict: bool) -> None:
    missing = sorted(set(layout) - set(reader.where) - packed)
    if strict and (missing or reader.unexpected):
        msg = []
        for what, names in (("missing", missing), ("unexpected", reader.unexpected)):
            if names:
                msg.append(f"{what} tensors ({len(names)}): {names[:8]}{' ...' if len(names) > 8 else ''}")
        raise CheckpointError(f"checkpoint {folder} does not match its config: " + "; ".join(msg))


def _assign(folder: Path, model: HybridLM, tensors: dict[str, torch.Tensor], kept_packed: set[str],
            strict: bool) -> None:
    """Assign the tensors in place; the parameters kept packed are installed afterwards (`Quantized.finish`)."""
    result = model.load_state_dict(tensors, strict=strict and not kept_packed, assign=True)
    lacking = [k for k in result.missing_keys if k not in kept_packed]
    if strict and kept_packed and (lacking or result.unexpected_keys):
        raise CheckpointError(f"checkpoint {folder} does not match its config: missing {lacking[:8]}, unexpected "
                              f"{result.unexpected_keys[:8]}")
    if not strict and lacking:
        raise CheckpointError(f"checkpoint {folder} lacks {lacking[:8]} (strict=False cannot invent weights)")


def _materialise_buffers(model: HybridLM, device: torch.device) -> None:
    """Non-persistent buffers are not in the state dict: create them on the target device."""
    for mod in model.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                mod.register_buffer(bname, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False)
