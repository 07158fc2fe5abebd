"""Hugging Face checkpoints: read and write the `nemotron_h` safetensors format.

A checkpoint is a folder with `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensor names are the ones transformers writes and the official
Nemotron 3 checkpoints use:

    backbone.embeddings.weight                         backbone.norm_f.weight        lm_head.weight
    backbone.layers.N.norm.weight
    backbone.layers.N.mixer.{in_proj,out_proj}.weight  .conv1d.{weight,bias}  .{A_log,D,dt_bias}  .norm.weight
    backbone.layers.N.mixer.{q,k,v,o}_proj.weight
    backbone.layers.N.mixer.gate.{weight,e_score_correction_bias}
    backbone.layers.N.mixer.experts.E.{up,down}_proj.weight          one 2-D tensor per expert
    backbone.layers.N.mixer.shared_experts.{up,down}_proj.weight
    backbone.layers.N.mixer.{fc1,fc2}_latent_proj.weight              LatentMoE only
    mtp.*                                                             the MTP block (Super)

Our modules carry these names already, except that the routed experts of a layer live in two 3-D
tensors; `_expand_experts` / the stacking in `load_pretrained` convert between the two layouts.

Loading is strict and memory-frugal: the model is built on the meta device, every tensor is read from a
memory-mapped safetensors file, checked against the expected name and shape, cast, and assigned in place
(`load_state_dict(assign=True)`), so a checkpoint never exists twice in RAM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemotron3.config import ModelConfig
from nemotron3.model.hybrid import HybridLM

_EXPERT_RE = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")
_DISK_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_FP32_ALWAYS = ("e_score_correction_bias",)  # kept in fp32 whatever the model dtype (as transformers does)


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes."""


def _state_dict_for_disk(model: HybridLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (disk name, tensor) pairs: our state dict with each 3-D expert tensor split per expert."""
    for name, tensor in model.state_dict().items():
        m = _EXPERT_RE.match(name)
        if m:
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", tensor[e]
        else:
            yield name, tensor


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return files


def _has_mtp_tensors(files: list[Path]) -> bool:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if any(k.startswith("mtp.") for k in f.keys()):
                return True
    return False


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> HybridLM:
    """Load a `nemotron_h` checkpoint folder into a HybridLM.

    dtype: cast floating tensors to this dtype (the routers' correction bias stays fp32). None keeps the
    checkpoint's dtype. device: where the weights go (default CPU). A missing, unexpected or mis-shaped
    tensor raises CheckpointError naming it. `mtp.*` tensors are skipped when the config has no MTP block;
    a config that declares MTP over a checkpoint without any `mtp.*` tensor (what transformers saves, as it
    has no MTP module) loads the backbone alone, with a warning.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = ModelConfig.from_hf(folder)
    device = torch.device(device or "cpu")
    files = _checkpoint_files(folder)
    if config.num_nextn_predict_layers and not _has_mtp_tensors(files):
        # transformers has no MTP module and saves none: load the backbone and say so
        warnings.warn(
            f"{folder}: config declares {config.num_nextn_predict_layers} MTP block(s) but the checkpoint has no "
            "mtp.* tensors; loading the model without MTP", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = HybridLM(config)
    expected = {name: t for name, t in model.state_dict().items()}
    # disk name -> (our name, expert index or None), and the shape the disk tensor must have
    wanted: dict[str, tuple[str, int | None, tuple[int, ...]]] = {}
    for name, t in expected.items():
        m = _EXPERT_RE.match(name)
        if m:
            for e in range(t.shape[0]):
                wanted[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = (name, e, tuple(t.shape[1:]))
        else:
            wanted[name] = (name, None, tuple(t.shape))
    has_mtp = any(n.startswith("mtp.") for n in expected)

    loaded: dict[str, torch.Tensor] = {}
    expert_parts: dict[str, list[torch.Tensor | None]] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    with ExitStack() as stack:
        for file in files:
            try:
                f = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {file}: {e}") from e
            for disk_name in f.keys():
                if disk_name not in wanted:
                    if disk_name.startswith("mtp.") and not has_mtp:
                        continue
                    unexpected.append(disk_name)
                    continue
                ours, expert, shape = wanted[disk_name]
                got = tuple(f.get_slice(disk_name).get_shape())
                if got != shape:
                    raise CheckpointError(
                        f"tensor {disk_name} in {file.name} has shape {list(got)}, but the config needs {list(shape)}"
                    )
                t = f.get_tensor(disk_name)
                target = torch.float32 if ours.endswith(_FP32_ALWAYS) else (dtype or t.dtype)
                t = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
                seen.add(disk_name)
                if expert is None:
                    loaded[ours] = t
                else:
                    parts = expert_parts.setdefault(ours, [None] * expected[ours].shape[0])
                    parts[expert] = t
    missing = sorted(set(wanted) - seen)
    if strict and (missing or unexpected):
        msg = []
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"checkpoint {folder} does not match its config: " + "; ".join(msg))
    for ours, parts in expert_parts.items():
        if all(p is not None for p in parts):
            loaded[ours] = torch.stack(parts)  # type: ignore[arg-type]
            parts.clear()
    result = model.load_state_dict(loaded, strict=strict, assign=True)
    if not strict and result.missing_keys:
        # keep the model usable: materialise whatever was not in the checkpoint with the usual init
        raise CheckpointError(f"checkpoint {folder} lacks {result.missing_keys[:8]} (strict=False cannot invent weights)")
    # non-persistent buffers are not in the state dict: materialise them on the target device
    for mod in model.modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                mod.register_buffer(bname, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False)
    return model.eval()


def save_pretrained(
    model: HybridLM,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write `config.json`, `generation_config.json` and safetensors (sharded above `max_shard_bytes`, with an
    index). Files are written into a temporary folder next to `path` and moved in only once complete, so an
    interrupted save never leaves a half-written tensor file behind."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        model.config.save(tmp)
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
               "pad_token_id": model.config.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in _state_dict_for_disk(model):
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.detach().to("cpu").contiguous()
            size += nbytes
        if len(shards) == 1:
            names = {"model.safetensors": shards[0]}
        else:
            n = len(shards)
            names = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                "weight_map": {k: fname for fname, s in names.items() for k in s},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, tensors in names.items():
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        # remove weights of an older save that this one does not overwrite (e.g. shards -> single file)
        for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
            if not (tmp / old.name).exists():
                old.unlink()
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
