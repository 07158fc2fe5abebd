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
tensors; `state_dict_for_disk` and the stacking in `load_pretrained` convert between the two layouts.

Loading is strict and memory-frugal: the model is built on the meta device, every tensor is read from a
memory-mapped safetensors file, checked against the expected name, shape and kind of dtype, cast, and assigned in
place (`load_state_dict(assign=True)`). A tensor that needs no conversion stays a view into the file's mapping. The
per-expert tensors are copied into the stacked 3-D tensors (as is anything cast or moved to another device), and the
file pages they were read from are then dropped from the process (madvise(MADV_DONTNEED) on Linux): otherwise those
pages would stay resident, next to the copies, for as long as the mapping lives, which is as long as any view into
the file does. So after loading, about one checkpoint's worth of memory is resident, not two.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemotron3 import folders
from nemotron3.config import ModelConfig
from nemotron3.model.hybrid import HybridLM

_EXPERT_RE = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")
_FP32_ALWAYS = ("e_score_correction_bias",)  # kept in fp32 whatever the model dtype (as transformers does)
_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes, or one of its files cannot be read."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but not quite as it says (the CLI shows it in one line, `warning: ...`)."""


class NonFiniteWeightWarning(CheckpointWarning):
    """A checkpoint's weight holds NaN or inf values (a diverged run, a bad conversion): the model would load and
    generate garbage without a word; `load_pretrained(..., strict_finite=True)` refuses it instead."""


def non_finite_count(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """NaN and ±inf values in a floating-point tensor, counted `chunk` elements at a time (the bool temporary
    stays small however large the tensor); 0 for other dtypes."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        flat = flat.float()  # the float8 kinds have no isfinite of their own
    return sum(int(part.numel() - torch.isfinite(part).sum()) for part in flat.split(chunk))


# Quantized checkpoints (config.json has a `quantization_config`) are decoded by a reader that the quantization
# layer registers (nemotron3.quant.checkpoint, imported with the package; it sits above this module, so it cannot
# be imported from here): reader(quantization_config, tensor names, get(name) -> tensor, {disk name: shape the
# model needs}, files={disk name: file}, folder=, pack=, dtype=) -> ({disk name: dense tensor}, finish(model,
# quantize_activations), {disk names of the weights kept packed}). finish, called on the loaded model, installs
# the packed layers and, if asked, makes the model quantize the activations as the scheme does.
QuantizedReader = Callable[..., tuple[dict[str, torch.Tensor], Callable[[HybridLM], None] | None]]
_QUANTIZED_READER: list[QuantizedReader] = []


def register_quantized_reader(reader: QuantizedReader) -> None:
    """Install the decoder of quantized checkpoints (one, replacing any earlier)."""
    _QUANTIZED_READER[:] = [reader]


def quantization_config(folder: str | os.PathLike) -> dict | None:
    """The `quantization_config` of a checkpoint folder's config.json, else the settings of an older ModelOpt
    export's `hf_quant_config.json` (`{"producer": ..., "quantization": {...}}`), or None."""
    for name, key in (("config.json", "quantization_config"), ("hf_quant_config.json", None)):
        try:
            raw = json.loads((Path(folder) / name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        qc = (raw.get(key) if key else raw) if isinstance(raw, dict) else None
        if isinstance(qc, dict) and (key or isinstance(qc.get("quantization"), dict)):
            return qc
    return None


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a checkpoint's weight files (the safetensors files and their index)."""
    files, _ = checkpoint_files(Path(folder))
    index = Path(folder) / "model.safetensors.index.json"
    return sum(f.stat().st_size for f in files) + (index.stat().st_size if index.is_file() else 0)


class _Decoded:
    """The dense tensors a quantized checkpoint decodes to, read like a `_Shard`."""

    def __init__(self, file: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.file, self._t, self.keys = file, tensors, list(tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]

    def release(self, t: torch.Tensor) -> None:
        pass


def state_dict_for_disk(model: HybridLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (disk name, tensor) pairs: our state dict with each 3-D expert tensor split per expert."""
    for name, tensor in model.state_dict().items():
        m = _EXPERT_RE.match(name)
        if m:
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", tensor[e]
        else:
            yield name, tensor


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder, and the index's tensor -> file map when it is sharded."""
    index = folder / "model.safetensors.index.json"
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
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return files, None


_state_dict_for_disk, _checkpoint_files = state_dict_for_disk, checkpoint_files  # the older private spellings


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


class _Shard:
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
                with open("/proc/self/maps") as maps:
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


def load_pretrained(
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

    Memory: a tensor that needs no conversion stays a view into the memory-mapped file (no copy is made). The
    per-expert tensors are copied into one preallocated 3-D tensor per projection, and so is anything cast or
    moved; the file pages of what was copied are released right away, so about one checkpoint's worth of memory
    is resident once the model has been used.

    Quantized checkpoints (nemotron3 quantize: compressed-tensors NVFP4 / FP8, MX9/6/4, MXFP4, SeedLM;
    docs/low-precision.md §7) load with their weights decoded exactly as the format defines, then cast to
    `dtype`; `quantize_activations=True` also quantizes the inputs of the quantized layers as the scheme does
    (NVFP4 with the calibrated input scales, FP8 per token; the weight-only schemes ignore it). The weights of
    the schemes that can stay packed (NVFP4, FP8, MX9/6/4, MXFP4; ModelOpt NVFP4 / FP8) do: their layers become
    inference-only PackedLinear / PackedExperts that decode a tile at a time inside the matmul
    (quant/packed.py), so resident weight bytes follow the format; `dequantize=True`, or `quantize_activations`,
    decodes them into ordinary dense layers instead.

    Every floating-point tensor is checked for NaN and inf as it is read (a quantized checkpoint's once decoded):
    each one that has any gets a NonFiniteWeightWarning, `PATH: TENSOR has N non-finite values`, and loads as it
    is; with `strict_finite=True` the first one is a CheckpointError with the same words instead.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    config = ModelConfig.from_hf(folder)
    device = torch.device(device or "cpu")
    files, weight_map = checkpoint_files(folder)
    with ExitStack() as stack:
        shards = [_Shard(file, stack) for file in files]
        if weight_map is not None:
            held = {shard.file: set(shard.keys) for shard in shards}
            absent = [(name, fname) for name, fname in weight_map.items() if name not in held[folder / fname]]
            if absent:
                name, fname = absent[0]
                raise CheckpointError(
                    f"{folder / 'model.safetensors.index.json'} places {len(absent)} tensor(s) in files that do not "
                    f"hold them, e.g. {name} in {fname}")
        if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for s in shards for k in s.keys):
            # transformers has no MTP module and saves none: load the backbone and say so
            warnings.warn(
                f"{folder}: config declares {config.num_nextn_predict_layers} MTP block(s) but the checkpoint has no "
                "mtp.* tensors; loading the model without MTP", CheckpointWarning, stacklevel=2)
            config = config.replace(num_nextn_predict_layers=0)
        with torch.device("meta"):
            model = HybridLM(config)
        expected = model.state_dict()
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
        finish, packed = None, set()
        qc = quantization_config(folder)
        if qc is not None:
            if not _QUANTIZED_READER:
                raise CheckpointError(f"{folder} is quantized, and no reader of quantized checkpoints is loaded")
            owner = {k: s for s in shards for k in s.keys}
            dense, finish, packed = _QUANTIZED_READER[0](
                qc, list(owner), lambda k: owner[k].get(k), {k: v[2] for k, v in wanted.items()},
                files={k: s.file for k, s in owner.items()}, folder=folder,
                pack=not (dequantize or quantize_activations), dtype=dtype, device=device)
            shards = [_Decoded(folder / "model.safetensors", dense)]

        loaded: dict[str, torch.Tensor] = {}
        stacked: dict[str, torch.Tensor] = {}  # our 3-D expert tensors, filled one expert at a time
        filled: dict[str, set[int]] = {}
        where: dict[str, Path] = {}  # disk name -> the file it came from
        unexpected: list[str] = []
        for shard in shards:
            for disk_name in shard.keys:
                if disk_name in where:
                    raise CheckpointError(f"tensor {disk_name} is in both {where[disk_name]} and {shard.file}")
                where[disk_name] = shard.file
                if disk_name not in wanted:
                    if not (disk_name.startswith("mtp.") and not has_mtp):
                        unexpected.append(disk_name)
                    continue
                ours, expert, shape = wanted[disk_name]
                got = shard.shape(disk_name)
                if got != shape:
                    raise CheckpointError(f"tensor {disk_name} in {shard.file.name} has shape {list(got)}, but the "
                                          f"config needs {list(shape)}")
                t = shard.get(disk_name)
                bad = non_finite_count(t)
                if bad:
                    msg = f"{shard.file}: {disk_name} has {bad} non-finite value{'s' if bad > 1 else ''}"
                    if strict_finite:
                        raise CheckpointError(f"{msg}; refusing the checkpoint (strict_finite, --strict-finite)")
                    # issued from here (stacklevel 1): a checkpoint loaded twice in one process is reported once
                    warnings.warn(msg, NonFiniteWeightWarning, stacklevel=1)
                if t.is_floating_point() != expected[ours].is_floating_point():
                    kind = "a floating-point" if expected[ours].is_floating_point() else "an integer"
                    raise CheckpointError(f"tensor {disk_name} in {shard.file.name} has dtype {t.dtype}, but the "
                                          f"model needs {kind} tensor")
                target = t.dtype
                if t.is_floating_point():
                    target = torch.float32 if ours.endswith(_FP32_ALWAYS) else (dtype or t.dtype)
                if expert is None:
                    out = t.to(device=device, dtype=target)
                    if out is not t:
                        shard.release(t)
                    loaded[ours] = out
                    continue
                if ours not in stacked:
                    stacked[ours] = torch.empty((expected[ours].shape[0], *shape), dtype=target, device=device)
                    filled[ours] = set()
                elif dtype is None and target != stacked[ours].dtype:
                    raise CheckpointError(f"tensor {disk_name} in {shard.file.name} has dtype {t.dtype}, but the other "
                                          f"experts of {ours} are {stacked[ours].dtype}")
                stacked[ours][expert].copy_(t)
                shard.release(t)
                filled[ours].add(expert)
    missing = sorted(set(wanted) - set(where) - packed)
    if strict and (missing or unexpected):
        msg = []
        for what, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                msg.append(f"{what} tensors ({len(names)}): {names[:8]}{' ...' if len(names) > 8 else ''}")
        raise CheckpointError(f"checkpoint {folder} does not match its config: " + "; ".join(msg))
    for ours, experts in stacked.items():
        if len(filled[ours]) == experts.shape[0]:
            loaded[ours] = experts
    kept_packed = {wanted[n][0] for n in packed}  # installed by `finish` below
    result = model.load_state_dict(loaded, strict=strict and not packed, assign=True)
    lacking = [k for k in result.missing_keys if k not in kept_packed]
    if strict and packed and (lacking or result.unexpected_keys):
        raise CheckpointError(f"checkpoint {folder} does not match its config: missing {lacking[:8]}, unexpected "
                              f"{result.unexpected_keys[:8]}")
    if not strict and lacking:
        raise CheckpointError(f"checkpoint {folder} lacks {lacking[:8]} (strict=False cannot invent weights)")
    if finish is not None:
        finish(model, quantize_activations)
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
        for name, t in state_dict_for_disk(model):
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
        folders.umask_modes(tmp, list(tmp.iterdir()))  # safetensors makes its files 0600 whatever the umask
        # weights of an older save that this one does not overwrite (e.g. shards -> single file): removed once the
        # new files are in, so that a kill in between never leaves the folder without weights
        stale = [old for old in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]
                 if not (tmp / old.name).exists()]
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
        for old in stale:
            old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
