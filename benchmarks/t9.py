"""The T9 benchmark model: a 9.2M-parameter LatentMoE hybrid (`MEME*EME`, d=256, 16 experts top-4, latent 128).

Its Hugging Face config ships beside this file (`t9_config.json`, the same model as the `t9` preset). Every
benchmark builds it with transformers (`NemotronHForCausalLM(NemotronHConfig(**cfg))`, seed 0), saves it, and
loads the same weights into each system it compares.
"""

from __future__ import annotations

import json
from pathlib import Path

T9_CONFIG = Path(__file__).resolve().parent / "t9_config.json"


def t9_hf_config(path: Path = T9_CONFIG) -> dict:
    """The config dict of `path` (default: the T9 config); a missing or malformed file is an error."""
    if not Path(path).is_file():
        raise SystemExit(f"error: no benchmark config at {path}")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON: {e}") from None
