"""nemotron3: the Nemotron 3 recipe (hybrid Mamba-2 + attention LatentMoE with MTP) in pure PyTorch.

Public API:
    ModelConfig        the model description; .from_hf(path_or_dict), .to_hf(), .preset(name)
    HybridLM           the model; model(input_ids) -> logits (B, T, V)
    load_pretrained    read a Hugging Face `nemotron_h` checkpoint folder (nemotron3.checkpoint.load)
    save_pretrained    write one (nemotron3.checkpoint.save)
    checkpoint         the folder's owner: checkpoint.open(folder, device, dtype) -> (model, tokenizer)
    count_parameters   total / active parameter counts of a config, without allocating
    Engine             batched generation with the hybrid cache: Engine(model).generate(prompts, params)
    SamplingParams     one request's sampling settings (vLLM's names): SamplingParams(max_tokens=32, ...)
    chat               the chat format: chat.render(messages, ...) -> text, chat.parse(text) -> message
"""

from nemotron3 import chat, checkpoint
from nemotron3.checkpoint import CheckpointError
from nemotron3.checkpoint import load as load_pretrained
from nemotron3.checkpoint import save as save_pretrained
from nemotron3.config import ModelConfig
from nemotron3.engine import Engine, SamplingParams
from nemotron3.model import HybridLM, count_parameters

__all__ = ["ModelConfig", "HybridLM", "load_pretrained", "save_pretrained", "count_parameters", "CheckpointError",
           "Engine", "SamplingParams", "chat", "checkpoint"]
