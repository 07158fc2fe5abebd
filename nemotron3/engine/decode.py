"""The decode fast path: t new tokens per cache row through the whole model in as few tensor ops as we can.

Why a second path
-----------------
At the sizes a CPU serves, a decode step does almost no arithmetic: it multiplies the weight matrices by
one vector per row. What costs is the number of tensor ops, each paying a fixed dispatch cost in eager
PyTorch, and the reference cached path (`HybridLM.forward` with a cache) spends hundreds of them on
generality: row gathers and scatters, padding masks, fp32 casts, separate q/k/v projections, the grouped
MoE with its sort and `.tolist()`. Each mixer therefore has, in its own file, a fused step for this
decoder (`Mamba2Step`, `AttentionStep`, `MoEStep`, `MLPStep`: weights packed once, residual adds folded
into `addmm`, states updated in place; docs/inference.md §3), tested against its `forward`. This module
holds no mixer mathematics: it packs the steps from the model's modules, and composes them with the
embedding, the pre-norms (one `F.rms_norm` each), the final norm and the LM head. Every row of the cache
is decoded (no gathers); the attention mask is built once per step for all layers.

`forward(tokens (B, t), cache)` serves the one-token step of plain decoding and the (k+1)-token verify of
speculative decoding (the recurrent states of each token go to the rollback ring when the cache records
them); `mtp(...)` runs the MTP block's steps for the drafter.

The maths is the reference's up to float summation order (tests/engine/test_engine_decode.py compares the two
step by step to 1e-4). Packed tensors are copies: `FastDecoder.is_stale()` notices in-place updates of
the model's weights (RL updates them between rollouts) through the tensors' version counters, replaced
tensors and swapped modules through their identities, and the Engine rebuilds before the next call.
The copies cost about one more copy of the model's weights in memory (experts included), fine at the
sizes a CPU decodes.

`FastDecoder.supports(model)` is False, and the Engine uses the reference path, for models the steps do
not cover: layers swapped for quantized ones (quant/convert.py; they are not plain `nn.Linear`s), dtypes
other than fp32 and bf16, and projection biases (`mlp_bias` / `use_bias`, which the Nemotron 3 checkpoints do
not use, so the steps do not carry them).

bf16 models (docs/inference.md §6) decode in bf16 (weights, residual stream, KV cache) with the arithmetic
that accumulates in fp32: the Mamba conv, dt, SSM state and gated norm, the router and the MoE combination,
every norm's statistics, and the logits (an fp32 copy of the LM head over the bf16 final hidden state). One-row
steps on a CPU switch oneDNN off so that bf16 matmuls take torch's GEMV (model/packing.py). `pack` replaces
the dense weights by packed ones, e.g. per-channel int8 (quant/int8.py), for a separately measured variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.model.attention import AttentionStep
from nemotron3.model.hybrid import HybridLM
from nemotron3.model.mamba2 import Mamba2Step
from nemotron3.model.moe import MoEStep
from nemotron3.model.norms import MLPStep
from nemotron3.model.packing import Packer, gemv_only, mm, nbytes, pack_weight

DTYPES = (torch.float32, torch.bfloat16)  # the weight dtypes the fast path decodes


def compile_static(fn):
    """torch.compile of one decode forward (docs/inference.md §3): one graph (fullgraph), static shapes, Inductor's
    C++ wrapper, so no Python runs between the kernels. Inductor's FX graph cache keeps the compiled graph on disk
    (TORCHINDUCTOR_CACHE_DIR; keyed by the graph, the Inductor config and torch's version): a later process that
    traces the same graph loads it instead of compiling."""
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


def batch_bucket(n: int) -> int:
    """The compiled batch size serving n rows: the next power of two (1, 2, 4, 8, 16, ...)."""
    return 1 << (n - 1).bit_length()


def _layer_step(block: nn.Module, config, traceable: bool, pack: Packer | None):
    """The fused step of one Block's mixer."""
    if block.kind == "M":
        return Mamba2Step(block.mixer, config.layer_norm_epsilon, pack)
    if block.kind == "*":
        return AttentionStep(block.mixer, pack)
    if block.kind == "E":
        return MoEStep(block.mixer, config, traceable, pack)
    return MLPStep(block.mixer, pack)


@dataclass
class _MTPSteps:
    """One MTP module: fusion (enorm, hnorm, eh_proj), its layers' steps, and final_layernorm."""

    enorm: torch.Tensor
    hnorm: torch.Tensor
    w_eh_t: object  # 2H -> H (packing.py)
    layers: list  # (cache layer index, pre-norm weight, step)
    final_norm: torch.Tensor


class FastDecoder:
    """`step(tokens, cache, n_keys, uniform)` -> logits (B, V): the next token of every cache row.

    traceable=True selects the variant written for `torch.compile` (no host sync: MoEStep's traceable
    path). `pack`: how the steps store their weight matrices (model/packing.py; None: dense, in the model's
    dtype); quant/int8.py's `Int8Weight` gives the int8 weight-only variant.
    """

    def __init__(self, model: HybridLM, traceable: bool = False, pack: Packer | None = None) -> None:
        if not self.supports(model):
            raise ValueError("FastDecoder needs an fp32 or bf16 HybridLM of plain nn.Linear layers without "
                             "biases; use the reference path")
        self.model = model
        self.config = model.config
        self.traceable = traceable
        self.pack = pack
        self.eps = model.config.layer_norm_epsilon
        self.dtype = model.lm_head.weight.dtype  # the activations' (and the cache's) dtype
        # one-row bf16 steps on a CPU: oneDNN off, torch's bf16 GEMV on (model/packing.py)
        self._gemv = self.dtype == torch.bfloat16 and model.lm_head.weight.device.type == "cpu" and not traceable
        self._build()

    @staticmethod
    def supports(model: HybridLM) -> bool:
        """Plain fp32 or bf16 modules without projection biases or projection hooks only (quantized models,
        models built with `mlp_bias` / `use_bias`, hooked projections and other dtypes run the reference cached
        path). The weight matrices share one dtype; vectors (norms, A_log, D, biases) may be fp32 or it."""
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and (type(mod) is not nn.Linear or mod.bias is not None
                                               or mod._forward_pre_hooks or mod._forward_hooks):
                return False  # a hook on a projection (activation quantization): the fused steps would skip it
            if mod.__dict__.get("gemm_quantizer") is not None:
                return False
        dtype = model.lm_head.weight.dtype
        return dtype in DTYPES and all(p.dtype in (dtype, torch.float32) and (p.dim() < 2 or p.dtype == dtype)
                                       for p in model.parameters())

    def _signature(self) -> tuple:
        """(identity, version) of every weight, and the identity of every module: changes when a weight is
        replaced or updated in place, or a module swapped (quantization)."""
        tensors = list(self.model.parameters())
        tensors += [b for name, b in self.model.named_buffers() if name.endswith("e_score_correction_bias")]
        return tuple((id(t), 0 if t.is_inference() else t._version) for t in tensors) + tuple(
            id(m) for m in self.model.modules())

    def is_stale(self) -> bool:
        """True if a weight or module of the model changed since the fused copies were made."""
        return self._signature() != self._versions

    @torch.no_grad()
    def _build(self) -> None:
        model, c, dt, pack = self.model, self.config, self.dtype, self.pack
        self.emb = model.backbone.embeddings.weight
        self.norm_f = model.backbone.norm_f.weight.to(dt)
        self.head_t = model.lm_head.weight.float().t().contiguous()  # (H, V) fp32: the logits are fp32
        self.layers = [(i, b.norm.weight.to(dt), _layer_step(b, c, self.traceable, pack))
                       for i, b in enumerate(model.backbone.layers)]
        self.mtp_modules: list[_MTPSteps] = []
        if model.mtp is not None:
            for module in model.mtp.modules_:
                first, last, base = module.layers[0], module.layers[-1], module.first_cache_layer
                self.mtp_modules.append(_MTPSteps(
                    first.enorm.weight.to(dt), first.hnorm.weight.to(dt), pack_weight(first.eh_proj.weight, pack),
                    [(base + j, b.norm.weight.to(dt), _layer_step(b, c, self.traceable, pack))
                     for j, b in enumerate(module.layers)],
                    last.final_layernorm.weight.to(dt)))
        self._versions = self._signature()

    def weight_bytes(self) -> int:
        """Bytes of the weights the decode step reads (embedding, steps, norms, fp32 head), each storage once:
        in fp32 the fused copies, in bf16 mostly the model's own tensors, with `pack` the packed ones."""
        seen, total = set(), 0

        def add(v) -> None:
            nonlocal total
            if isinstance(v, torch.Tensor):
                key = v.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
            elif isinstance(v, (list, tuple)):
                for u in v:
                    add(u)
            elif v is not None and hasattr(v, "mm"):
                if id(v) not in seen:
                    seen.add(id(v))
                    total += nbytes(v)

        add([self.emb, self.norm_f, self.head_t])
        for _, norm, step in self.layers + [x for m in self.mtp_modules for x in m.layers]:
            add([norm] + list(vars(step).values()))
        for m in self.mtp_modules:
            add([m.enorm, m.hnorm, m.w_eh_t, m.final_norm])
        return total

    def refresh(self) -> None:
        """Rebuild the fused copies from the model's current weights."""
        self._build()

    def _norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (h.shape[-1],), w, self.eps)

    def _run(self, h: torch.Tensor, layers: list, view) -> torch.Tensor:
        for i, norm, step in layers:
            h = step(h, self._norm(h, norm), view.layer(i))
        return h

    # ------------------------------------------------------------------ the steps
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache, n_keys: int | None = None, uniform: bool = False,
                commit: bool = True) -> torch.Tensor:
        """tokens (B, t) for cache rows 0..B-1 -> final-normed hidden states (B·t, H), row-major.

        n_keys = max(lengths) + t limits attention to the keys some row holds; `uniform` says all rows
        have the same length. n_keys=None attends over the cache's whole capacity with a mask built from
        `cache.lengths`: every shape is then fixed by (rows, max_seq_len), which is what `torch.compile`
        needs to compile the step once. With a recording cache, every token's recurrent states go to the
        rollback ring. `commit` advances the lengths (cache.commit).
        """
        view = cache.begin_all(tokens.shape[1], n_keys, uniform)
        with gemv_only(self._gemv and tokens.numel() == 1):
            h = self._run(F.embedding(tokens.reshape(-1), self.emb), self.layers, view)  # (B·t, H)
        if commit:
            cache.commit(view)
        return self._norm(h, self.norm_f)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache, n_keys: int | None = None, uniform: bool = False) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) fp32; appends one token to every row. The caller advances
        `cache.lengths` (the Engine does it once per step, outside a compiled region)."""
        return self.logits(self.forward(tokens[:, None], cache, n_keys, uniform, commit=False))

    @torch.no_grad()
    def mtp(self, prev_hidden: torch.Tensor, tokens: torch.Tensor, cache, start: torch.Tensor,
            depth: int = 1) -> torch.Tensor:
        """MTP depth `depth` at MTP positions start[b] + i: prev_hidden (B·t, H) = h_{depth-1}, tokens (B, t)
        the next tokens -> h_depth (B·t, H). Appends to the MTP layers' slots; positions are the caller's."""
        m = self.mtp_modules[(depth - 1) % len(self.mtp_modules)]
        t = tokens.shape[1]
        view = cache.begin_all(t, None if self.traceable else int(start.max()) + t, False, start=start)
        emb = F.embedding(tokens.reshape(-1), self.emb)
        prev = self._norm(prev_hidden.to(self.dtype), m.hnorm)
        with gemv_only(self._gemv and tokens.numel() == 1):
            u = mm(torch.cat([self._norm(emb, m.enorm), prev], dim=-1), m.w_eh_t)
            u = self._run(u, m.layers, view)
        return self._norm(u, m.final_norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V) fp32 (the bf16 hidden state times the fp32 head)."""
        return torch.matmul(hidden.float(), self.head_t)
