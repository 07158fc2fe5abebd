"""A checkpoint folder's files: config.json, the safetensors files and their index, the quantization settings.

    config.json                    the `nemotron_h` config (ModelConfig.from_hf), maybe a `quantization_config`
    model.safetensors              every tensor; or shards listed in
    model.safetensors.index.json   `weight_map` (tensor -> file) and `metadata.total_size`
    hf_quant_config.json           an older ModelOpt export's quantization settings
    tokenizer.json                 (tokenizer_config.json, generation_config.json beside it)

`Shard` is one open safetensors file: reads name the file (and the tensor) when safetensors fails, and
`release(t)` drops the file pages under a tensor once it has been copied (see its docstring).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from nemotron3.config import ModelConfig
from nemotron3.hf import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MODELOPT_CONFIG = "hf_quant_config.json"
TOKENIZER = "tokenizer.json"
_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a checkpoint folder (it has a config.json); what the commands test before loading."""
    return (Path(folder) / CONFIG).is_file()


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether the folder has a tokenizer (tokenizer.json), without reading it."""
    return (Path(folder) / TOKENIZER).is_file()


def read_config(folder: str | os.PathLike, strict: bool = True) -> ModelConfig:
    """The folder's ModelConfig (FileNotFoundError naming config.json when there is none)."""
    return ModelConfig.from_hf(Path(folder), strict=strict)


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and the index's tensor -> file map when it is sharded."""
    index = folder / INDEX
    if index.is_file():
        try:
            raw = json.loads(index.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is not valid JSON: {e}") from e
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard file names")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files, weight_map
    single = folder / WEIGHTS
    if single.is_file():
        return [single], None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return files, None


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a checkpoint's weight files (the safetensors files and their index)."""
    files, _ = weight_files(Path(folder))
    index = Path(folder) / INDEX
    return sum(f.stat().st_size for f in files) + (index.stat().st_size if index.is_file() else 0)


def quantization_config(folder: str | os.PathLike) -> dict | None:
    """The `quantization_config` of a checkpoint folder's config.json, else the settings of an older ModelOpt
    export's `hf_quant_config.json` (`{"producer": ..., "quantization": {...}}`), or None."""
    for name, key in ((CONFIG, "quantization_config"), (MODELOPT_CONFIG, None)):
        try:
            raw = json.loads((Path(folder) / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        qc = (raw.get(key) if key else raw) if isinstance(raw, dict) else None
        if isinstance(qc, dict) and (key or isinstance(qc.get("quantization"), dict)):
            return qc
    return None


def quantization_source(folder: str | os.PathLike, qc: dict) -> Path:
    """The file a folder's quantization settings came from, for messages."""
    return Path(folder) / (MODELOPT_CONFIG if isinstance(qc.get("quantization"), dict) else CONFIG)


def tensor_headers(folder: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (safetensors dtype name, shape)} of every weight file, from the headers only (any size)."""
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    with ExitStack() as stack:
        for shard in open_shards(Path(folder), stack):
            for k in shard.keys:
                headers[k] = (shard.dtype_name(k), shard.shape(k))
    return headers


def _libc_madvise() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


class Shard:
    """One open safetensors file.

    Reads turn safetensors' own exceptions into CheckpointError naming the file (and the tensor). safetensors
    hands out tensors that are views into a private memory map of the whole file; `release(t)` drops the pages
    under `t` from this process once `t` has been copied (madvise(MADV_DONTNEED) on the pages lying wholly inside
    `t`). The pages are clean, so if anything read them again they would be faulted in from the file; dropping them
    matters because the mapping lives as long as any uncopied tensor of the file does, and every page read from it
    would otherwise stay resident next to the copy.
    """

    def __init__(self, file: Path, stack: ExitStack) -> None:
        self.file = file
        try:
            self._f = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            self.keys: list[str] = list(self._f.keys())
        except Exception as e:  # safetensors raises its own error type, a bare Exception subclass
            raise CheckpointError(f"cannot read {file}: {e}") from e
        self._maps: list[tuple[int, int]] | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._f.get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.file}: {e}") from e

    def dtype_name(self, name: str) -> str:
        """safetensors' name of the tensor's dtype (`F32`, `BF16`, `U8`, `F8_E4M3`, ...)."""
        try:
            return self._f.get_slice(name).get_dtype()
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.file}: {e}") from e

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.file}: {e}") from e

    def _mappings(self) -> list[tuple[int, int]]:
        """Address ranges where this process maps the file (from /proc/self/maps)."""
        if self._maps is None:
            self._maps = []
            real = os.path.realpath(self.file)
            try:
                with Path("/proc/self/maps").open() as maps:
                    for line in maps:
                        parts = line.split(maxsplit=5)
                        if len(parts) == 6 and parts[5].rstrip("\n") == real:
                            lo, hi = parts[0].split("-")
                            self._maps.append((int(lo, 16), int(hi, 16)))
            except OSError:
                pass
        return self._maps

    def release(self, t: torch.Tensor) -> None:
        if _MADVISE is None or t.device.type != "cpu" or not t.is_contiguous():
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self._mappings()):
            return  # not a view into this file's mapping: leave it alone
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            _MADVISE(first, last - first, _MADV_DONTNEED)  # best effort: a failure only costs memory


class Decoded:
    """The dense tensors a quantized checkpoint decodes to, read like a `Shard` (nothing to release)."""

    def __init__(self, file: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.file, self._t, self.keys = file, tensors, list(tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]

    def release(self, t: torch.Tensor) -> None:
        pass


def open_shards(folder: Path, stack: ExitStack) -> list[Shard]:
    """Every weight file of the folder, open (closed with `stack`); an index that places a tensor in a file that
    does not hold it is a CheckpointError naming the index and the tensor."""
    files, weight_map = weight_files(folder)
    shards = [Shard(file, stack) for file in files]
    if weight_map is not None:
        held = {shard.file: set(shard.keys) for shard in shards}
        absent = [(name, fname) for name, fname in weight_map.items() if name not in held[folder / fname]]
        if absent:
            name, fname = absent[0]
            raise CheckpointError(f"{folder / INDEX} places {len(absent)} tensor(s) in files that do not hold them, "
                                  f"e.g. {name} in {fname}")
    return shards
