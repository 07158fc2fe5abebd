"""Checkpoints: atomic, in the one checkpoint format, plus the state that makes `--resume` exact.

A checkpoint folder is a Hugging Face folder (`save_pretrained`: config.json, generation_config.json,
model.safetensors) plus `tokenizer.json`, so `load_pretrained`, the engine and the server open it directly.
A training checkpoint `step-NNNNNN/` adds `trainer_state.pt`: optimizer state, step, schedule, the data
position and fingerprint, the run's arguments, and every RNG state (torch, Python, NumPy, and the
per-module generators of layers that own one, such as NVFP4's stochastic rounding).

**Atomicity.** Everything is written into a hidden temporary folder next to the target
(`.tmp-step-NNNNNN-xxxx`), then swapped into place by renames (nemotron3/folders.py); a process killed at any
point leaves either the old folder or the new one, or the pieces from which `recover_all()` (run by every start:
`prepare_out`, `resume_point`, the next save) puts one back together; `latest()` never lists a temporary.
Folders and files get the modes the umask gives.

**Whose folder.** `prepare_out` runs before a training run writes its `--out`: an `--out` holding another run
(or a checkpoint) is refused unless `--overwrite`, which removes only that run's final/, step-NNNNNN/,
summary.json and metrics.jsonl; `--model` inside what the run replaces (its final/ or a step-NNNNNN/) is always
refused.

**Exactness.** Weights are written in fp32 (the training dtype), so reloading them is lossless; the
optimizer's moments and step counts are saved as tensors; the batch at a given position is a pure function
of the data (data.py). Together: a resumed run computes bit for bit what the uninterrupted run computes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nemotron3 import folders
from nemotron3.checkpoint import save as save_folder
from nemotron3.options import ConfigError
from nemotron3.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


def save(folder: str | os.PathLike, model: nn.Module, tokenizer: Tokenizer,
         state: dict[str, Any] | None = None) -> Path:
    """Write model + tokenizer (+ resume state) to `folder` atomically; returns `folder`."""
    def fill(tmp: Path) -> None:
        save_folder(model, tmp, tokenizer)  # the checkpoint format: nemotron3/checkpoint/
        if state is not None:
            torch.save(state, tmp / STATE_FILE)

    return folders.write_folder(folder, fill)


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
    """Finish or roll back the saves a kill interrupted, and remove what is left of them (folders.recover_all)."""
    folders.recover_all(out_dir)


LAYOUT = ("final", "summary.json", "metrics.jsonl")  # with step-NNNNNN/: what a training run writes in its --out


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_out(out: str | os.PathLike, resume: bool, overwrite: bool, model: str | os.PathLike | None = None,
                reads: dict[str, Any] | None = None) -> None:
    """Before a training run writes `out`: put back a folder whose save a kill interrupted, then refuse an `out`
    that would lose another run or what the run reads (ConfigError naming the flag and the folder).

    A new run needs an `out` that is missing, empty or free of another run's files (`folders.run_marks`);
    `overwrite` lets it replace an earlier run: that run's final/, step-NNNNNN/, summary.json and metrics.jsonl
    are removed now (so that neither `prune` nor a later `--resume` mistakes them for this run's), nothing else.
    `model` (`--model`) inside `out` needs `overwrite`; it, or a path in `reads` ({flag: path or paths}), inside
    what the run replaces is refused even then."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if _rank0():
        clean_temporaries(out)
    sources = [("--model", model)] if model is not None else []
    for flag, paths in (reads or {}).items():
        sources += [(flag, p) for p in (paths if isinstance(paths, (list, tuple)) else [paths]) if p is not None]
    for flag, path in sources:
        if (rel := folders.within(path, out)) is None:
            continue
        first = rel.parts[0] if rel.parts else ""
        if first in LAYOUT or _STEP_RE.match(first):
            raise ConfigError(f"--out {out}: the run replaces {out / first}, which holds {flag} {path}; choose "
                              "another --out")
        if flag == "--model" and not resume and not overwrite:
            raise ConfigError(f"--out {out} contains --model {path}: choose another --out, or add --overwrite to "
                              "write the run there (the --model checkpoint is kept)")
    if resume:
        return
    marks = folders.run_marks(out)
    if marks and not overwrite:
        raise ConfigError(f"--out {out} holds another run ({', '.join(marks)}): choose another --out, add --resume "
                          "to continue it, or --overwrite to replace it")
    if marks and _rank0():
        for p in out.iterdir():
            if p.name in LAYOUT[1:] and p.is_file():
                p.unlink()
            elif p.is_dir() and (p.name == "final" or _STEP_RE.match(p.name)):
                shutil.rmtree(p)


def resume_point(out_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The newest complete training checkpoint in `out_dir` and its resume state (`--resume`); ValueError when
    there is none. Puts back first a checkpoint whose save a kill interrupted."""
    if _rank0():
        clean_temporaries(out_dir)
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
