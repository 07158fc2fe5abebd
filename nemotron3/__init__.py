"""nemotron3: the Nemotron 3 recipe (hybrid Mamba-2 + attention LatentMoE with MTP) in pure PyTorch.

Public API:
    ModelConfig        the model description; .from_hf(path_or_dict), .to_hf(), .preset(name)
    HybridLM           the model; model(input_ids) -> logits (B, T, V)
    load_pretrained    read a Hugging Face `nemotron_h` checkpoint folder
    save_pretrained    write one
    count_parameters   total / active parameter counts of a config, without allocating
    Engine             batched generation with the hybrid cache: Engine(model).generate(prompts, params)
    SamplingParams     one request's sampling settings (vLLM's names): SamplingParams(max_tokens=32, ...)
    chat               the chat format: chat.render(messages, ...) -> text, chat.parse(text) -> message
"""

from nemotron3 import chat
from nemotron3.config import ModelConfig
from nemotron3.engine import Engine, SamplingParams
from nemotron3.hf import CheckpointError, load_pretrained, save_pretrained
from nemotron3.model import HybridLM, count_parameters
from nemotron3.quant import checkpoint as _quantized_checkpoints  # noqa: F401  (registers the reader)

__all__ = ["ModelConfig", "HybridLM", "load_pretrained", "save_pretrained", "count_parameters", "CheckpointError",
           "Engine", "SamplingParams", "chat"]
