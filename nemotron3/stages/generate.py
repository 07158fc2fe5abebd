"""The generation stage: text from a checkpoint folder, streamed token by token as the engine produces it.

    from nemotron3.stages.generate import GenerateConfig, generate
    result = generate(GenerateConfig(model="runs/x/final", prompt="What is 2 + 3?", max_new_tokens=64))
    result.text, result.tokens, result.stats

    nemotron3 generate --model DIR --prompt "Once upon a time" --max-new-tokens 64
    nemotron3 generate --model DIR --ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 0
    nemotron3 generate --model DIR --chat --prompt "What is 7 * 6?" --max-thinking-tokens 64

With `chat` the prompt is one user turn in the chat format (nemotron3/chat.py) with the generation prompt
(reasoning on unless `no_think`), the row stops at the end of the assistant's turn, and
`max_thinking_tokens` caps its reasoning (engine/thinking.py).

The tokenizer is the folder's `tokenizer.json` (Hugging Face `tokenizers` format). With `ids` the prompt is
raw token ids and the output is printed as ids too (and decoded when the folder has a tokenizer). Stats
(prefill and decode tokens/s, forward passes) go to stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from nemotron3 import checkpoint
from nemotron3.engine.folder import open_folder
from nemotron3.engine.params import SamplingParams
from nemotron3.engine.text import TextStream, not_utf8
from nemotron3.options import CPU_COUNT, ConfigError, StageConfig, device_of, device_option, fail, option


def parse_ids(text: str) -> list[int]:
    """`"1,2,3"` -> [1, 2, 3] (the `--ids` flag)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"ids (--ids) = {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    return ids


@dataclass
class GenerateConfig(StageConfig):
    """One generation call: the checkpoint, the prompt (text or ids) and the sampling settings."""

    stage = "generate"

    model: Path = option(help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    prompt: str | None = option(None, "prompt text, tokenized with the folder's tokenizer.json")
    ids: list[int] | None = option(None, "prompt as comma-separated token ids, e.g. 1,2,3", metavar="IDS",
                                   parse=parse_ids)
    max_new_tokens: int = option(64, "tokens to generate at most", min=1)
    temperature: float = option(0.0, "sampling temperature (0 = greedy)", min=0.0)
    top_k: int = option(0, "keep the k most likely tokens (0 = off)", min=0)
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)", min=0.0, max=1.0)
    seed: int | None = option(None, "seed of the sampling streams (default: a fresh one)", min=0)
    no_stop: bool = option(False, "ignore the checkpoint's end-of-sequence ids")
    dtype: str = option("float32", "weights' dtype in memory", choices=("float32", "bfloat16"))
    device: str = device_option()
    threads: int | None = option(None, "torch intra-op threads (default: torch's; at most the CPUs this process may "
                                 "use)", min=1, max=CPU_COUNT)
    compile: bool = option(False, "torch.compile the decode step (slow first call)")
    strict_finite: bool = option(False, "refuse a checkpoint with NaN or inf in a weight (default: load it, "
                                 "warning once per such tensor)")
    speculative: int | None = option(None, "MTP speculative decoding with K drafted tokens per verify forward "
                                     "(lossless; models with an MTP block; default: the device's, engine/params.py: "
                                     "off on a CPU, where it was measured slower)", min=0, metavar="K")

    chat: bool = option(False, "wrap the prompt as a user turn of the chat format and stop at the turn's end")
    no_think: bool = option(False, "with --chat: reasoning off (the generation prompt ends with an empty think)")
    max_thinking_tokens: int | None = option(None, "cap the reasoning at N tokens, closing </think> at a line "
                                             "end (engine/thinking.py)", min=0, metavar="N")

    def validate(self) -> None:
        super().validate()
        if self.chat and self.prompt is None:
            raise ConfigError("--chat needs --prompt TEXT")
        if (self.prompt is None) == (self.ids is None):
            raise ConfigError("give exactly one of --prompt TEXT and --ids 1,2,3")
        if self.ids is not None and not self.ids:
            fail(self, "ids", "is empty; give at least one token id")
        if self.prompt is not None and not self.prompt:
            fail(self, "prompt", "is empty")
        if self.prompt is not None and (problem := not_utf8(self.prompt)):
            fail(self, "prompt", problem)


@dataclass
class GenerateResult:
    tokens: list[int]  # the new token ids (a stop token ends them and is included)
    text: str | None  # their decoding, when the checkpoint has a tokenizer
    stats: dict = field(default_factory=dict)  # the engine's stats of the call


def generate(cfg: GenerateConfig, stream: TextIO | None = None) -> GenerateResult:
    """Generate from `cfg.model`; the new text (or ids) is written to `stream` as it comes, when given."""
    device = device_of(cfg)  # first: a device this machine lacks is refused before anything is read
    folder = Path(cfg.model)
    if not checkpoint.is_checkpoint(folder):
        raise ConfigError(f"model (--model) {folder} is not a checkpoint folder (no config.json)")
    if cfg.prompt is not None and not checkpoint.has_tokenizer(folder):
        raise ConfigError(f"{folder} has no tokenizer.json; pass the prompt as token ids with --ids 1,2,3")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    served = open_folder(folder, cfg.dtype, cfg.compile, strict_finite=cfg.strict_finite, device=device)
    if cfg.max_thinking_tokens is not None and not served.has_think:
        raise ConfigError(f"--max-thinking-tokens needs a tokenizer with <think> and </think> tokens ({folder})")
    tok = served.tokenizer
    if cfg.prompt is not None:
        text = cfg.prompt
        if cfg.chat:
            text = tok.render([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True,
                              enable_thinking=not cfg.no_think)
        ids = served.encode(text)
    else:
        ids = list(cfg.ids)
    stops = [] if cfg.no_stop else served.chat_stops if cfg.chat else None
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, seed=cfg.seed, stop_token_ids=stops,
                            num_speculative_tokens=cfg.speculative, max_thinking_tokens=cfg.max_thinking_tokens)
    steps = served.engine.stream([ids], params)
    new: list[int] = []
    text_out = TextStream(tok) if tok is not None else None
    for step in steps:
        if step[0] is None:
            break
        new.append(step[0])
        piece = text_out.push(step[0]) if text_out is not None else ""
        if stream is not None:
            stream.write(piece if cfg.prompt is not None else f"{step[0]},")
            stream.flush()
    text = tok.decode(new) if tok is not None else None
    if stream is not None:
        if cfg.prompt is not None:
            stream.write(text_out.flush())
        stream.write("\n")
        if cfg.ids is not None and tok is not None:
            stream.write(text + "\n")
    return GenerateResult(new, text, dict(served.engine.last_stats))


def main(cfg: GenerateConfig) -> int:
    """`nemotron3 generate`: stream to stdout, stats to stderr."""
    result = generate(cfg, stream=sys.stdout)
    s = result.stats
    print(f"[{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new; prefill {s['prefill_tok_s']:.0f} tok/s, "
          f"decode {s['decode_tok_s']:.0f} tok/s, {s['forward_passes']} forward passes, {s['path']} path]",
          file=sys.stderr)
    if "acceptance_length" in s:
        rates = ", ".join(f"{r:.2f}" for r in s["acceptance_rate_per_position"])
        print(f"[speculative: {s['acceptance_length']:.2f} tokens per verify forward; acceptance by draft "
              f"position {rates}]", file=sys.stderr)
    return 0
