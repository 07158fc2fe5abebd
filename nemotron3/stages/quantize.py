"""The quantize stage: a checkpoint's GEMM weights in NVFP4, FP8, MX9/6/4, MXFP4 or SeedLM, as a new checkpoint.

    from nemotron3.stages.quantize import QuantizeConfig, quantize
    out = quantize(QuantizeConfig(model=Path("runs/sft/final"), out=Path("runs/nvfp4"), scheme="nvfp4"))
    model = nemotron3.load_pretrained(out)          # decoded weights; quantize_activations=True emulates inputs

    nemotron3 quantize --model runs/sft/final --out runs/nvfp4 --scheme nvfp4 --calib 32

nvfp4, nvfp4-w4a16 and fp8 are written in the compressed-tensors format that vLLM serves (`quantization_config`
in config.json, `ignore` listing the layers kept in the checkpoint's precision); the others in nemotron3's own
layout. nvfp4 runs a calibration pass over `--calib` held-out task documents for the activations' global scales.
The tokenizer and generation config are copied. The folder is written next to `--out` and swapped in only when
complete (nemotron3/folders.py): an error leaves nothing behind, and a kill at any point leaves the old folder or
the new one, or pieces that the next `quantize` puts back together. An `--out` holding an earlier quantized
checkpoint is replaced only with `--overwrite`; any other non-empty `--out`, and one that holds `--model`, never.
docs/low-precision.md §7 has the formats and the policy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from nemotron3 import checkpoint, folders, tasks
from nemotron3.checkpoint import CheckpointError, checkpoint_bytes, is_checkpoint, quantization_config, read_config
from nemotron3.config import ModelConfig
from nemotron3.hf import state_dict_for_disk
from nemotron3.options import StageConfig, device_of, device_option, fail, option
from nemotron3.quant import checkpoint as qckpt
from nemotron3.tokenizer import Tokenizer

__all__ = ["QuantizeConfig", "quantize", "SCHEMES", "checkpoint_bytes", "main"]

SCHEMES = qckpt.SCHEMES
CALIB_SEED = 1   # the calibration documents' seed: evaluation (nemotron3.eval.accuracy) draws seed 0
# The most calibration documents there are: tasks.mixture spreads them evenly over the 6 task families, and the
# held-out split of the smallest at difficulty 1 (modpow) holds 82 problems; 80 per family (as run/plan.py's
# MAX_EVAL_PROBLEMS) are always found. More could never be drawn: tasks.generate would try 200 draws per document
# before giving up (hours for 10**9).
MAX_CALIB = 80 * 6
_OWN_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json"}


@dataclass
class QuantizeConfig(StageConfig):
    """The checkpoint to quantize, the scheme and where the result goes."""

    stage = "quantize"

    model: Path = option(Path("runs/sft/final"), "checkpoint folder to quantize (not already quantized)", metavar="DIR")
    out: Path = option(Path("runs/quantized"), "folder to write (must not exist, be empty, or be an earlier "
                       "quantized checkpoint, which --overwrite replaces)", metavar="DIR")
    scheme: str = option("nvfp4", "number format of the quantized weights", choices=SCHEMES)
    calib: int = option(32, f"held-out task documents for nvfp4's activation calibration (at most {MAX_CALIB}: the "
                        "held-out split has no more at difficulty 1)", min=1, max=MAX_CALIB)
    strict_finite: bool = option(False, "refuse a checkpoint with NaN or inf in a weight (default: load it, "
                                 "warning once per such tensor)")
    overwrite: bool = option(False, "replace the quantized checkpoint already in --out")
    device: str = device_option()  # where the calibration forwards and the weights' encoding run

    def validate(self) -> None:
        super().validate()
        if self.out.resolve() == self.model.resolve():
            fail(self, "out", "must differ from --model")
        if folders.within(self.model, self.out) is not None:  # writing --out replaces the folder, and it with it
            fail(self, "out", f"holds --model {self.model}, which writing {self.out} would delete; choose another "
                 "--out")
        if self.out.exists() and not self.out.is_dir():
            fail(self, "out", f"{self.out} exists and is not a folder")
        if not self.out.is_dir() or not any(self.out.iterdir()):
            return
        if quantization_config(self.out) is None:
            fail(self, "out", f"{self.out} is not empty and not a quantized checkpoint; refusing to overwrite it")
        if subfolders := sorted(p.name + "/" for p in self.out.iterdir() if p.is_dir()):
            fail(self, "out", f"{self.out} holds folders that quantize does not write ({', '.join(subfolders)}); "
                 "refusing to overwrite it")
        if not self.overwrite:
            fail(self, "out", f"{self.out} holds an earlier quantized checkpoint: add --overwrite to replace it, or "
                 "choose another --out")


def _source(cfg: QuantizeConfig) -> None:
    """Clear errors for a folder that is not a checkpoint or is already quantized."""
    if not is_checkpoint(cfg.model):
        raise CheckpointError(f"{cfg.model} is not a checkpoint folder (no config.json)")
    qc = quantization_config(cfg.model)
    if qc is not None:
        raise CheckpointError(f"{cfg.model} is already quantized ({qc.get('scheme') or qc.get('format')}); "
                              "quantize the high-precision checkpoint it came from")


def calibration_batches(tokenizer: Tokenizer, n: int) -> list[torch.Tensor]:
    """n held-out task documents (prompt, reasoning, answer), one (1, T) batch each."""
    docs = tasks.mixture(n, seed=CALIB_SEED, split="heldout")
    return [torch.tensor([[tokenizer.bos_id, *tokenizer.encode(p.text()), tokenizer.eos_id]]) for p in docs]


def quantize(cfg: QuantizeConfig, console: Console | None = None) -> Path:
    """Write the quantized checkpoint; returns its folder."""
    console = console or Console()
    device = device_of(cfg)
    folders.recover(cfg.out)  # a quantize killed mid-swap: put its --out back first
    cfg.validate()            # ... and check it again, as it now is
    _source(cfg)
    read_config(cfg.model)
    model, tokenizer = checkpoint.open(cfg.model, device, torch.float32, strict_finite=cfg.strict_finite,
                                       dequantize=True, require_tokenizer=cfg.scheme == "nvfp4")
    quant, ignore, misfit = qckpt.plan(model, cfg.scheme)
    if not quant:
        raise CheckpointError(f"{cfg.model}: no weight can be quantized to {cfg.scheme}")
    if misfit:
        console.print(f"[yellow]kept in high precision: {len(misfit)} weight(s) whose input width is not a multiple "
                      f"of {qckpt.BLOCK[cfg.scheme]}: {misfit[:6]}{' ...' if len(misfit) > 6 else ''}[/]")
    input_scales: dict[str, torch.Tensor] = {}
    if cfg.scheme == "nvfp4":
        modules = {n.removesuffix(".weight") for n in quant}
        amax = qckpt.calibrate(model, calibration_batches(tokenizer, cfg.calib), modules)
        input_scales = {m: qckpt.input_global_scale(a).cpu() for m, a in amax.items()}
    disk = dict(state_dict_for_disk(model))
    raw = checkpoint.load(cfg.model, strict_finite=cfg.strict_finite)  # the stored dtypes, for what stays high
    stored = dict(state_dict_for_disk(raw))
    tensors: dict[str, torch.Tensor] = {}
    for name in disk:
        if name in quant:
            module = name.removesuffix(".weight")
            for suffix, t in qckpt.encode_weight(cfg.scheme, disk[name]).items():
                tensors[f"{module}.{suffix}"] = t.cpu().contiguous()  # encoded on --device, written from the CPU
            if module in input_scales:
                tensors[f"{module}.input_global_scale"] = input_scales[module]
        else:
            tensors[name] = stored[name].detach().contiguous()
    out = _write(cfg, model.config, tensors, qckpt.quantization_config(cfg.scheme, ignore))
    n_quant = sum(int(torch.Size(s).numel()) for s in quant.values())
    console.print(f"[bold]quantized[/] {cfg.model} -> {out}: {cfg.scheme} ({qckpt.bits_per_weight(cfg.scheme):g} "
                  f"bits/weight) on {len(quant)} weights ({n_quant:,} parameters), {len(ignore)} kept high; "
                  f"{checkpoint_bytes(cfg.model):,} -> {checkpoint_bytes(out):,} bytes")
    return out


def _write(cfg: QuantizeConfig, config: ModelConfig, tensors: dict[str, torch.Tensor], qc: dict) -> Path:
    def fill(tmp: Path) -> None:
        hf = config.to_hf()
        hf["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for f in cfg.model.iterdir():        # tokenizer, generation config, ...
            if f.is_file() and f.name not in _OWN_FILES and f.name != folders.MARKER and \
                    not f.name.endswith(".safetensors"):
                shutil.copyfile(f, tmp / f.name)  # the content; the mode is the umask's (copy2 would keep the source's)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return folders.write_folder(cfg.out, fill)


def main(cfg: QuantizeConfig) -> int:
    """`nemotron3 quantize`: write the checkpoint (`nemotron3 info DIR` shows its bytes per layer type)."""
    quantize(cfg, Console())
    return 0
