"""Writing a checkpoint folder: config.json, generation_config.json, the safetensors files (sharded above a size,
with an index) and, when given, the tokenizer.

Files are written into a temporary folder next to the target and moved in only once complete, so an interrupted
save never leaves a half-written tensor file behind; stale weight files of an older save are removed once the new
ones are in. The routed experts are written one 2-D tensor per expert (nemotron3/hf.py's naming rule).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from nemotron3 import folders
from nemotron3.checkpoint.files import INDEX, WEIGHTS
from nemotron3.hf import state_dict_for_disk
from nemotron3.model.hybrid import HybridLM


class SavesItself(Protocol):
    def save(self, folder: str | os.PathLike) -> None: ...


def save(model: HybridLM, path: str | os.PathLike, tokenizer: SavesItself | None = None, *,
         max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write the model (and `tokenizer.save(...)`'s files, when given) into `path`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        model.config.save(tmp)
        eos: int | list[int] = model.config.eos_token_id
        turn_end = getattr(tokenizer, "end_of_turn_id", None)  # a chat reply ends at its template's turn marker
        if turn_end is not None and turn_end != eos:
            eos = [eos, turn_end]  # so transformers' generate stops there too, as the engine and the server do
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": eos,
               "pad_token_id": model.config.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_weights(model, tmp, max_shard_bytes)
        folders.umask_modes(tmp, list(tmp.iterdir()))  # safetensors makes its files 0600 whatever the umask
        # weights of an older save that this one does not overwrite (e.g. shards -> single file): removed once the
        # new files are in, so that a kill in between never leaves the folder without weights
        stale = [old for old in [*folder.glob("model*.safetensors"), *folder.glob(INDEX)]
                 if not (tmp / old.name).exists()]
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
        for old in stale:
            old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer is not None:  # its own small files, written by the tokenizer (a whole folder's atomicity is
        tokenizer.save(folder)  # folders.write_folder's, which the training checkpoints and `quantize` use)


def _write_weights(model: HybridLM, tmp: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict_for_disk(model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    if len(shards) == 1:
        names = {WEIGHTS: shards[0]}
    else:
        n = len(shards)
        names = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
            "weight_map": {k: fname for fname, s in names.items() for k in s},
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for fname, tensors in names.items():
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
