"""`open(folder) -> (model, tokenizer)`: how every command opens a checkpoint folder.

The model comes from `load` (checkpoint/load.py), the tokenizer from `nemotron3.tokenizer.Tokenizer.from_folder`
(tokenizer.json with its config and chat template; None when the folder has no tokenizer.json: a Hugging Face folder
may ship weights alone, and `generate --ids` needs no tokenizer). This is the shape of transformers'
`from_pretrained` pair (`AutoModelForCausalLM` + `AutoTokenizer` on one folder) and of nanochat's
`checkpoint_manager.load_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nemotron3.checkpoint.files import is_checkpoint
from nemotron3.checkpoint.load import load
from nemotron3.hf import CheckpointError
from nemotron3.model.hybrid import HybridLM
from nemotron3.tokenizer import Tokenizer

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_tokenizer(folder: str | os.PathLike, required: bool = False) -> Tokenizer | None:
    """The folder's tokenizer (`Tokenizer.from_folder`: tokenizer.json, tokenizer_config.json and the chat template),
    or None when it has no tokenizer.json (FileNotFoundError naming the file when `required`); ValueError naming
    the file for one that cannot be read."""
    return Tokenizer.from_folder(folder, missing_ok=not required)


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype given as torch.dtype or by name (`float32`, `bfloat16`, `float16`); ValueError for another name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def open(folder: str | os.PathLike, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, *, strict_finite: bool = False, dequantize: bool = False,
         quantize_activations: bool = False, require_tokenizer: bool = False) -> tuple[HybridLM, Tokenizer | None]:
    """(model, tokenizer) of a checkpoint folder.

    device: where the weights go (default the CPU). dtype: the floating-point dtype of the weights (None keeps the
    checkpoint's; the routers' correction bias stays fp32 in any dtype, as in transformers). Weight-only quantized
    weights stay packed unless `dequantize` (or `quantize_activations`, which emulates the scheme's activations on
    dense layers); `strict_finite` refuses NaN / inf weights instead of warning. CheckpointError for a folder that
    is not a checkpoint, and for any file or tensor that does not match (one line naming the file and tensor).
    The tokenizer is None for a folder without tokenizer.json, unless `require_tokenizer` (training), which makes
    that a FileNotFoundError naming the file.
    """
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a checkpoint folder (no config.json)")
    tokenizer = load_tokenizer(folder, require_tokenizer)  # first: a bad one is refused before the weights are read
    model = load(folder, dtype=torch_dtype(dtype), device=device, strict_finite=strict_finite, dequantize=dequantize,
                 quantize_activations=quantize_activations)
    return model, tokenizer
