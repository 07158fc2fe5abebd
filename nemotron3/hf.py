"""Hugging Face `nemotron_h` tensor names: the one rule for what a weight is called on disk, and the errors.

The names are the ones transformers writes and the official Nemotron 3 checkpoints use (docs/architecture.md §7):

    backbone.embeddings.weight                         backbone.norm_f.weight        lm_head.weight
    backbone.layers.N.norm.weight
    backbone.layers.N.mixer.{in_proj,out_proj}.weight  .conv1d.{weight,bias}  .{A_log,D,dt_bias}  .norm.weight
    backbone.layers.N.mixer.{q,k,v,o}_proj.weight
    backbone.layers.N.mixer.gate.{weight,e_score_correction_bias}
    backbone.layers.N.mixer.experts.E.{up,down}_proj.weight          one 2-D tensor per expert
    backbone.layers.N.mixer.shared_experts.{up,down}_proj.weight
    backbone.layers.N.mixer.{fc1,fc2}_latent_proj.weight              LatentMoE only
    mtp.*                                                             the MTP block (Super)

Our modules carry these names already, except that the routed experts of a layer live in two 3-D parameters
`...experts.up_proj` / `...experts.down_proj` (E, out, in). On disk each expert is its own module
`...experts.E.up_proj` with a 2-D `weight`. Every place that meets per-expert names (the folder reader and writer
in nemotron3/checkpoint/, the quantized layouts and packed layers in nemotron3/quant/) spells them through
`expert_module` / `split_expert` here, so the rule is written once.

This module sits below quant and checkpoint (layer 3, docs/architecture.md §10): it knows names, not folders.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "CheckpointWarning", "NonFiniteWeightWarning", "EXPERT_PROJS", "FP32_ALWAYS",
           "expert_module", "split_expert", "stacked_experts", "state_dict_for_disk", "disk_layout"]

EXPERT_PROJS = ("up_proj", "down_proj")
FP32_ALWAYS = ("e_score_correction_bias",)  # kept in fp32 whatever the model dtype (as transformers does)
_STACKED = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")                     # ours: the (E, out, in) stack
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)(?:\.weight)?$")  # disk: one expert's module


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes, or one of its files cannot be read."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but not quite as it says (the CLI shows it in one line, `warning: ...`)."""


class NonFiniteWeightWarning(CheckpointWarning):
    """A checkpoint's weight holds NaN or inf values (a diverged run, a bad conversion): the model would load and
    generate garbage without a word; `load_pretrained(..., strict_finite=True)` refuses it instead."""


def expert_module(experts: str, e: int, proj: str) -> str:
    """The disk module of expert `e`'s projection: `expert_module("….experts", 3, "up_proj")` is
    `….experts.3.up_proj` (its tensor is that plus `.weight`, or a quantized layout's suffixes)."""
    return f"{experts}.{e}.{proj}"


def split_expert(name: str) -> tuple[str, int, str] | None:
    """(experts module, expert index, projection) of a per-expert disk name (module or `.weight`), else None."""
    m = _PER_EXPERT.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def stacked_experts(name: str) -> tuple[str, str] | None:
    """(experts module, projection) of one of our stacked (E, out, in) parameters, else None."""
    m = _STACKED.match(name)
    return (m.group(1), m.group(2)) if m else None


def state_dict_for_disk(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (disk name, tensor) pairs: our state dict with each 3-D expert tensor split per expert."""
    for name, tensor in model.state_dict().items():
        stacked = stacked_experts(name)
        if stacked:
            for e in range(tensor.shape[0]):
                yield f"{expert_module(stacked[0], e, stacked[1])}.weight", tensor[e]
        else:
            yield name, tensor


_state_dict_for_disk = state_dict_for_disk  # the older private spelling (tests, benchmarks)


def disk_layout(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """disk name -> (our name, expert index or None, the shape the disk tensor has) for a state dict (real or on
    the meta device): what a folder of this model must hold."""
    wanted: dict[str, tuple[str, int | None, tuple[int, ...]]] = {}
    for name, t in state.items():
        stacked = stacked_experts(name)
        if stacked:
            for e in range(t.shape[0]):
                wanted[f"{expert_module(stacked[0], e, stacked[1])}.weight"] = (name, e, tuple(t.shape[1:]))
        else:
            wanted[name] = (name, None, tuple(t.shape))
    return wanted
