"""The table of quantized layouts a folder may hold, keyed by its `quantization_config`'s `quant_method`.

    quant_method          reader                     decoders (nemotron3/quant/)
    modelopt              quant.modelopt.read        NVFP4 / W4A16_NVFP4 / FP8 (per tensor, per channel)
    compressed-tensors    quant.checkpoint.read      nvfp4, nvfp4-w4a16 (nvfp4-pack-quantized), fp8 (float-quantized)
    nemotron3             quant.checkpoint.read      mx9 / mx6 / mx4, mxfp4, seedlm4 / seedlm3

Each reader gets the folder's tensor names, a `get(name)` that reads one, the shape every disk weight must have and
`file_of(name)` for messages, and returns the dense tensors, the weights it keeps packed (quant/packed.py) and, for
the schemes that quantize activations, the hook that emulates them. A method not in the table, or a layout it does
not read, is a CheckpointError naming the config file; a tensor of the wrong shape or dtype names its file and name.
The table is written here, explicitly: no reader registers itself by being imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nemotron3.hf import CheckpointError
from nemotron3.quant import checkpoint as ours
from nemotron3.quant import modelopt
from nemotron3.quant.packed import PackedWeight, install, settle_experts

Getter = Callable[[str], torch.Tensor]
Reader = Callable[..., tuple[dict[str, torch.Tensor], dict[str, PackedWeight], Callable[[nn.Module], None] | None]]


def _modelopt(qc: dict, source: Path, keys: list[str], get: Getter, shapes: dict[str, tuple[int, ...]],
              file_of: Callable[[str], str], pack: bool):
    plain, packed = modelopt.read(qc, keys, get, shapes, file_of, str(source), pack)
    return plain, packed, None  # ModelOpt folders load weight-only (docs/low-precision.md §7)


def _ours(qc: dict, source: Path, keys: list[str], get: Getter, shapes: dict[str, tuple[int, ...]],
          file_of: Callable[[str], str], pack: bool):
    try:
        scheme = ours.scheme_of(qc)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return ours.read(scheme, qc, keys, get, shapes, file_of, pack)


SCHEMES: dict[str, Reader] = {"modelopt": _modelopt, "compressed-tensors": _ours, "nemotron3": _ours}


def method_of(qc: dict) -> str:
    """The table's key for a `quantization_config` (ModelOpt spells its method `modelopt` or `modelopt_fp4`, and
    an older export's `hf_quant_config.json` has none but a `quantization` object)."""
    return "modelopt" if modelopt.is_modelopt(qc) else str(qc.get("quant_method"))


@dataclass
class Quantized:
    """What the reader of a quantized folder produced: dense tensors for the ordinary load, and what to do to
    the loaded model (`finish`)."""

    dense: dict[str, torch.Tensor]
    packed: dict[str, PackedWeight]
    activations: Callable[[nn.Module], None] | None

    def finish(self, model: nn.Module, dtype: torch.dtype | None, device: torch.device,
               quantize_activations: bool) -> None:
        """Install the packed layers (computing in `dtype`, fp32 when None), then, if asked, the scheme's
        activation quantization."""
        install(model, self.packed, dtype or torch.float32, device)
        if quantize_activations and self.activations is not None:
            self.activations(model)


def read(qc: dict, source: Path, keys: list[str], get: Getter, shapes: dict[str, tuple[int, ...]],
         files: dict[str, Path], pack: bool) -> Quantized:
    """Decode a quantized folder's tensors with the reader of its `quant_method`; `pack` keeps the weights of
    the packable schemes packed. A stack of experts stays packed only if all of it is (`settle_experts`)."""
    method = method_of(qc)
    reader = SCHEMES.get(method)
    if reader is None:
        raise CheckpointError(f"{source}: unsupported quantization_config (quant_method "
                              f"{qc.get('quant_method')!r}); nemotron3 reads the quant_methods {', '.join(SCHEMES)}")

    def file_of(k: str) -> str:
        return str(files.get(k, source))

    dense, packed, act = reader(qc, source, keys, get, shapes, file_of, pack)
    settle_experts(packed, dense, shapes)
    return Quantized(dense, packed, act)
