"""HybridLM: embedding, one pre-norm residual block per pattern character, final norm, untied head.

    h = embeddings(ids)
    for each layer:  h = h + mixer(RMSNorm(h))        mixer ∈ {Mamba2Mixer, Attention, MoE, MLP}
    logits = lm_head(norm_f(h))

Module names are the Hugging Face checkpoint names (`backbone.layers.3.mixer.in_proj`, `lm_head`, ...),
so `state_dict()` keys are the on-disk keys except for the routed experts, which hf.py splits into one
2-D tensor per expert. Build under `torch.device("meta")` to get a model that allocates nothing (for
parameter counting or for loading a checkpoint without holding two copies).
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.config import ModelConfig
from nemotron3.model.block import Block
from nemotron3.model.moe import MoE
from nemotron3.model.mtp import MTP
from nemotron3.model.norms import RMSNorm


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(kind, config) for kind in config.pattern)
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class HybridLM(nn.Module):
    """The Nemotron 3 language model. `model(input_ids)` -> fp32 logits (B, T, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTP(config) if config.num_nextn_predict_layers > 0 else None
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every tensor's initial value, in one place (transformers' NemotronH init)."""
        c = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=c.initializer_range)
        nn.init.normal_(self.lm_head.weight, std=c.initializer_range)
        self.backbone.norm_f.weight.fill_(1.0)
        for block in self.backbone.layers:
            block.init_weights(c, c.num_hidden_layers)
        if self.mtp is not None:
            self.mtp.init_weights(c)

    def hidden_states(
        self, input_ids: torch.Tensor, cache=None, rows: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, H).

        With a `cache` (engine.HybridCache), the T tokens continue the sequences held by cache `rows`
        (all rows in order if None; B = len(rows)), the cache advances, and `valid` (B,) says how many of
        each row's T tokens are real (right padding, see `Mamba2Mixer.forward`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        view = None if cache is None else cache.begin(input_ids.shape[1], rows, valid)
        if view is not None and view.index.numel() != input_ids.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but the forward covers "
                             f"{view.index.numel()} cache rows")
        h = self.backbone.embeddings(input_ids)  # (B, T, H)
        for i, block in enumerate(self.backbone.layers):
            h = block(h, None if view is None else view.layer(i))
        if view is not None:
            cache.commit(view)
        return self.backbone.norm_f(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache=None,
        rows: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in fp32; with a `cache`, as `hidden_states` continues it.

        `last_only` returns only each row's last real position, (B, 1, V): what prefill needs, without the
        (T, V) logits of a long prompt.
        """
        h = self.hidden_states(input_ids, cache, rows, valid)
        if last_only:
            last = (valid - 1) if valid is not None else torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
            h = h[torch.arange(h.shape[0], device=h.device), last.to(h.device)][:, None]  # (B, 1, H)
        return self.lm_head(h).float()

    def forward_mtp(self, input_ids: torch.Tensor, depths: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits (B, T, V) and one logits tensor per MTP depth k = 1..depths.

        Depth k at position t sees tokens ≤ t+k and predicts token t+k+1, so only positions t < T-k-1 have a
        target inside the sequence; the last k positions also read a wrapped-around token embedding, and the
        loss must mask them (train/ does). Depth k runs module (k-1) mod num_modules (shared weights).
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP block (config num_nextn_predict_layers = 0)")
        h = self.hidden_states(input_ids)  # (B, T, H)
        logits = self.lm_head(h).float()
        out = []
        for k in range(1, depths + 1):
            next_embeds = self.backbone.embeddings(torch.roll(input_ids, -k, dims=1))  # Emb(token_{t+k})
            h = self.mtp.depth(k)(h, next_embeds)
            out.append(self.lm_head(h).float())
        return logits, out

    def set_activation_checkpointing(self, on: bool = True) -> HybridLM:
        """Checkpoint every block, backbone and MTP, in training forwards (`--activation-checkpointing`): each
        keeps only its input and is recomputed in backward, so a step's activation memory is one block's plus
        the block inputs instead of every intermediate of every block (model/recompute.py). Same gradients."""
        for module in self.modules():
            if isinstance(module, Block):
                module.checkpointing = on
        return self

    def compile_mixers(self, dynamic: bool = False) -> HybridLM:
        """torch.compile each Mamba-2 mixer in place, fusing the elementwise work around the SSD matmuls.

        Worth it for long runs at fixed shapes (training, benchmark prefill), not for short varying ones:
        each new shape recompiles, which takes tens of seconds (benchmarks/forward.py, docs/results.md).
        MoE layers are left eager: their per-expert split is data-dependent.
        """
        for block in self.backbone.layers:
            if block.kind == "M":
                block.mixer.compile(dynamic=dynamic)
        return self

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, active: bool = False) -> int:
        """Checkpoint element count: parameters plus persistent buffers (the routers' correction bias).

        `active=True` counts what one token touches: everything except the routed experts it is not sent
        to (both embedding matrices count in full, the convention of the Nano model card's 3.6B).
        """
        total = sum(p.numel() for p in self.parameters())
        total += sum(b.numel() for name, b in self.named_buffers() if name.endswith("e_score_correction_bias"))
        if active:
            blocks = list(self.backbone.layers) + (list(self.mtp.layers) if self.mtp is not None else [])
            for block in blocks:
                if isinstance(block.mixer, MoE):
                    experts = block.mixer.experts
                    per_expert = (experts.up_proj.numel() + experts.down_proj.numel()) // experts.num_experts
                    total -= (experts.num_experts - block.mixer.gate.top_k) * per_expert
        return total


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total and active-per-token parameter counts, computed on the meta device (allocates nothing)."""
    with torch.device("meta"):
        model = HybridLM(config)
    return {"total": model.num_parameters(), "active": model.num_parameters(active=True)}
