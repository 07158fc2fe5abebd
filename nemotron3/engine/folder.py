"""An engine opened from a checkpoint folder, with the tokenizer and the ids chat generation stops on.

    served = open_folder("runs/sft/final")
    served.engine.generate([served.encode("What is 2 + 3?")], 32, stop_token_ids=served.chat_stops)

The folder is what `pretrain`, `sft` and `rl` write (or a Hugging Face `nemotron_h` folder): config.json,
*.safetensors and, optionally, tokenizer.json, opened by `nemotron3.checkpoint.open` (the folder's one owner).
With a tokenizer that has `<think>` and `</think>` the engine gets their ids (and the newline tokens) for thinking
budgets; `chat_stops` adds the end of turn its chat template writes (`<|im_end|>` for ours) to the config's
end-of-sequence ids, since a chat reply ends with its turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nemotron3 import checkpoint
from nemotron3.engine.engine import Engine
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.tokenizer import Tokenizer


@dataclass
class OpenFolder:
    folder: Path
    engine: Engine
    tokenizer: Tokenizer | None
    has_think: bool  # the tokenizer has <think> and </think>: thinking budgets work
    chat_stops: list[int]  # end-of-sequence ids and <|im_end|> (when the tokenizer has it)

    def encode(self, text: str) -> list[int]:
        """The prompt's ids with the checkpoint's BOS in front (engine/text.py)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} has no tokenizer.json; pass the prompt as token ids")
        return self.tokenizer.encode_prompt(text, self.engine.config.bos_token_id)


def open_folder(folder: Path | str, dtype: str = "float32", compile: bool = False, strict_finite: bool = False,
                device: str | torch.device | None = None, **engine_kwargs) -> OpenFolder:
    """Load the model, its tokenizer and an Engine over them; ValueError for a folder that is not a checkpoint.
    NaN or inf weights are a warning naming the tensor, or with `strict_finite` a CheckpointError.
    `device`: where the weights are loaded (default the CPU); the engine computes where the model is."""
    folder = Path(folder)
    model, tok = checkpoint.open(folder, device=device, dtype=dtype, strict_finite=strict_finite)
    has_think = tok is not None and None not in (tok.think_start_id, tok.think_end_id)
    think = ThinkTokens.from_tokenizer(tok) if has_think else None
    engine = Engine(model, compile=compile, think_tokens=think, **engine_kwargs)
    stops = tok.chat_stop_ids(model.config.eos_token_ids) if tok is not None else sorted(model.config.eos_token_ids)
    return OpenFolder(folder, engine, tok, has_think, stops)
