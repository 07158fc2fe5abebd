"""Checkpoints: atomic, in the one checkpoint format, plus the state that makes `--resume` exact.

A checkpoint folder is a Hugging Face folder (`save_pretrained`: config.json, generation_config.json,
model.safetensors) plus `tokenizer.json`, so `load_pretrained`, the engine and the server open it directly.
A training checkpoint `step-NNNNNN/` adds `trainer_state.pt`: optimizer state, step, schedule, the data
position and fingerprint, the run's arguments, and every RNG state (torch, Python, NumPy, and the
per-module generators of layers that own one, such as NVFP4's stochastic rounding).

**Atomicity.** Everything is written into a hidden temporary folder next to the target
(`.tmp-step-NNNNNN-xxxx`), then renamed into place in one `os.rename`; a process killed mid-write leaves
only the temporary folder, which `latest()` ignores and `clean_temporaries()` removes, and the previous
checkpoint untouched. Re-saving over an existing folder renames the old one aside first, then deletes it.

**Exactness.** Weights are written in fp32 (the training dtype), so reloading them is lossless; the
optimizer's moments and step counts are saved as tensors; the batch at a given position is a pure function
of the data (data.py). Together: a resumed run computes bit for bit what the uninterrupted run computes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nemotron3.hf import save_pretrained
from nemotron3.train.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


def save(folder: str | os.PathLike, model: nn.Module, tokenizer: Tokenizer,
         state: dict[str, Any] | None = None) -> Path:
    """Write model + tokenizer (+ resume state) to `folder` atomically; returns `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        save_pretrained(model, tmp)
        tokenizer.save(tmp)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
            os.rename(folder, old / folder.name)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete training checkpoints in `out_dir`, oldest first (temporaries are never listed)."""
    out = []
    d = Path(out_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m[1]), p))
    return sorted(out)


def latest(out_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def prune(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` training checkpoints (keep <= 0 keeps everything)."""
    if keep > 0:
        for _, p in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def clean_temporaries(out_dir: str | os.PathLike) -> None:
    """Remove what interrupted saves left behind."""
    d = Path(out_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def resume_point(out_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The newest complete training checkpoint in `out_dir` and its resume state (`--resume`); ValueError when
    there is none."""
    ckpt = latest(out_dir)
    if ckpt is None:
        raise ValueError(f"--resume: no complete checkpoint (step-NNNNNN/ with {STATE_FILE}) in {out_dir}; save "
                         "some with --save-every")
    return ckpt, load_state(ckpt)


def load_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The resume state of a training checkpoint (our own pickle: RNG states are Python objects)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no {STATE_FILE}); `final/` cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file: torch raises RuntimeError, pickle UnpicklingError, EOFError, ...
        raise ValueError(f"{path}: cannot read the training state ({type(e).__name__}: {e}); resume from an "
                         f"older step-NNNNNN/ folder (delete {path.parent.name}/) or start a new run") from None


# ----------------------------------------------------------------------------------------- RNG
def _generator_owners(model: nn.Module) -> dict[str, Any]:
    """Objects that own per-device generators (`_generators: {device: torch.Generator}`), by a stable name:
    modules such as NVFP4Linear, and plain helper objects a module holds (e.g. the routed experts'
    `gemm_quantizer.layer`, kept outside the module tree so it adds no state_dict entry)."""
    owners = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "_generators", None), dict):
            owners[name] = m
        for attr, obj in vars(m).items():
            if attr.startswith("_") or isinstance(obj, (nn.Module, torch.Tensor)) or not hasattr(obj, "__dict__"):
                continue
            for path, o in ((attr, obj), (f"{attr}.layer", getattr(obj, "layer", None))):
                if isinstance(getattr(o, "_generators", None), dict):
                    owners[f"{name}#{path}"] = o
    return owners


def rng_state(model: nn.Module) -> dict[str, Any]:
    """Every random stream a training step can draw from."""
    owners = {name: {str(dev): g.get_state() for dev, g in o._generators.items()}
              for name, o in _generator_owners(model).items()}
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "generators": {k: v for k, v in owners.items() if v}}


def set_rng_state(state: dict[str, Any], model: nn.Module) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    owners = _generator_owners(model)
    for name, gens in state.get("generators", {}).items():
        if name not in owners:
            raise ValueError(f"checkpoint has RNG state for {name!r}, which this model does not have (was it trained "
                             f"with a different precision recipe, e.g. --nvfp4?)")
        for dev, s in gens.items():
            g = torch.Generator(device=dev)
            g.set_state(s)
            owners[name]._generators[torch.device(dev)] = g
