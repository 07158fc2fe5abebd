"""The one owner of a checkpoint folder (docs/architecture.md §7): its files, shards and index, loading and saving,
the quantized layouts it may hold, and `open(folder) -> (model, tokenizer)`, which every command uses.

    model, tokenizer = checkpoint.open("runs/sft/final", device="cpu", dtype=torch.bfloat16)
    checkpoint.save(model, "runs/copy", tokenizer)

    files.py     config.json, the safetensors files and their index, quantization settings, open shards
    load.py      `load`: a folder into a HybridLM (strict, memory-mapped, one copy resident)
    schemes.py   the table of quantized layouts by `quant_method` and the quant/ decoder each one calls
    save.py      `save`: config, generation config, weights (sharded above 5 GB), tokenizer
    folder.py    `open`, and the folder's tokenizer
    summary.py   what a folder holds (scheme, bytes per layer type), from the headers only

The per-expert tensor names are nemotron3/hf.py's rule (below this layer, since quant/ uses it too). Training state
(`trainer_state.pt`, resume) stays with the training loop, in nemotron3/train/checkpoint.py.
"""

from nemotron3.checkpoint.files import checkpoint_bytes, has_tokenizer, is_checkpoint, quantization_config, read_config
from nemotron3.checkpoint.folder import load_tokenizer, open, torch_dtype
from nemotron3.checkpoint.load import load
from nemotron3.checkpoint.save import save
from nemotron3.checkpoint.schemes import SCHEMES
from nemotron3.checkpoint.summary import describe, layer_bytes
from nemotron3.hf import CheckpointError, CheckpointWarning, NonFiniteWeightWarning

__all__ = ["open", "load", "save", "load_tokenizer", "has_tokenizer", "is_checkpoint", "read_config",
           "quantization_config", "checkpoint_bytes", "describe", "layer_bytes", "torch_dtype", "SCHEMES",
           "CheckpointError", "CheckpointWarning", "NonFiniteWeightWarning"]
