"""The export stage: a checkpoint as one file another runtime reads. Today: GGUF, for llama.cpp.

    nemotron3 export --model runs/sft/final --format gguf --outtype bf16 --out runs/model.gguf

    from nemotron3.export import ExportConfig, export
    path = export(ExportConfig(model=Path("runs/sft/final"), outtype="q8_0", out=Path("model.gguf")))

The file is llama.cpp's `nemotron_h_moe` architecture (`nemotron_h` for a model with dense MLPs instead of MoE),
with the names, layouts, types and metadata that llama.cpp's own converter writes (gguf_model.py), LatentMoE
included, and the tokenizer (gguf_vocab.py), so `llama-cli -m model.gguf` and llama-cpp-python run it without
llama.cpp's repository or transformers. `--outtype`: f32, bf16, or q8_0 (blocks of 32 weights with one fp16
scale); norms, the routers, the conv, A, D and the biases stay f32 in all three, as the converter keeps them.
The MTP block is left out (gguf_model.py says why). It is written next to `--out` and renamed into place when
complete: an error leaves nothing behind. It needs the optional package `gguf` (`pip install -e '.[gguf]'`).
docs/export.md has the details.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from nemotron3 import checkpoint, folders
from nemotron3.checkpoint import CheckpointError
from nemotron3.options import StageConfig, fail, option

__all__ = ["ExportConfig", "export", "main", "FORMATS", "OUTTYPES"]

FORMATS = ("gguf",)
OUTTYPES = ("f32", "bf16", "q8_0")
GGUF_PIN = "gguf==0.19.0"


@dataclass
class ExportConfig(StageConfig):
    """The checkpoint to export, the file format, its number format and the file to write."""

    stage = "export"

    model: Path = option(Path("runs/sft/final"), "checkpoint folder to export", metavar="DIR")
    format: str = option("gguf", "file format: gguf (llama.cpp)", choices=FORMATS)
    outtype: str = option("bf16", "number format of the weights (norms, routers, conv, A, D and biases stay f32)",
                          choices=OUTTYPES)
    out: Path = option(Path("runs/model.gguf"), "file to write", metavar="FILE")
    overwrite: bool = option(False, "replace the file already at --out")

    def validate(self) -> None:
        super().validate()
        if self.out.is_dir():
            fail(self, "out", f"{self.out} is a folder; give the file to write, e.g. {self.out / 'model.gguf'}")
        if self.out.exists() and not self.overwrite:
            fail(self, "out", f"{self.out} exists; --overwrite replaces it")
        if self.out.resolve().parent == self.model.resolve() and self.out.suffix in (".json", ".safetensors"):
            fail(self, "out", f"would replace a file of the checkpoint --model {self.model}")


def _gguf():
    """The gguf package, or one line saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise NotImplementedError(f"--format gguf needs the optional package {GGUF_PIN}: pip install -e '.[gguf]' "
                                  f"({e})") from e
    return gguf


def export(cfg: ExportConfig, console: Console | None = None) -> Path:
    """Write the file; returns its path."""
    console = console or Console()
    cfg.validate()
    gguf = _gguf()
    from nemotron3.export import gguf_model, gguf_vocab

    if not checkpoint.is_checkpoint(cfg.model):
        raise CheckpointError(f"{cfg.model} is not a checkpoint folder (no config.json)")
    config = checkpoint.read_config(cfg.model)
    arch = gguf_model.arch_of(config)
    model = checkpoint.load(cfg.model)  # the stored dtype, as views into the files; cast to f32 one at a time
    config = model.config
    state = model.state_dict()

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    gguf_model.add_metadata(writer, config, cfg.outtype, cfg.model.resolve().name)
    gguf_vocab.add_vocab(writer, cfg.model, config.vocab_size)
    counts: dict[str, int] = {}
    for name, t in gguf_model.gguf_tensors(state, config):
        data, qtype = gguf_model.encode(t, gguf_model.tensor_type(name, t.dim(), cfg.outtype))
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cfg.out.name}.", suffix=".tmp", dir=cfg.out.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~folders.current_umask())  # mkstemp makes it 0600
        os.replace(tmp, cfg.out)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    skipped = " (MTP block left out)" if config.num_nextn_predict_layers else ""
    types = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    console.print(f"wrote {cfg.out}: {gguf.MODEL_ARCH_NAMES[arch]}, {sum(counts.values())} tensors ({types}){skipped}, "
                  f"{cfg.out.stat().st_size / 2**20:.1f} MiB")
    return cfg.out


def main(cfg: ExportConfig) -> int:
    """`nemotron3 export`: write the file."""
    export(cfg, Console())
    return 0
