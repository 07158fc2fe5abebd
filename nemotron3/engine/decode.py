"""The decode fast path: t new tokens per cache row through the whole model in as few tensor ops as we can
(docs/inference.md §3, bf16 and int8: §6).

`FastDecoder` holds no mixer mathematics: it packs each mixer's fused step (`Mamba2Step`, `AttentionStep`,
`MoEStep`, `MLPStep`, in the mixers' own files) from the model's modules and composes them with the embedding, the
pre-norms, the final norm and the LM head, over every row of the cache, in place. It equals the reference cached
path up to float summation order (tests/engine/test_engine_decode.py); `is_stale()` notices changed weights.
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
    """`step(tokens, cache, n_keys, uniform)` -> logits (B, V): the next token of every cache row. traceable: the
    variant for `torch.compile` (no host sync); `pack`: how weight matrices are stored (model/packing.py; None:
    dense in the model's dtype, quant/int8.py `Int8Weight`: int8 weight-only)."""

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
        """Plain fp32 or bf16 modules, without projection biases or hooks (quantized, biased, hooked models and
        other dtypes run the reference cached path); vectors (norms, A_log, D) may be fp32 beside bf16 matrices."""
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
        """Bytes of the weights a decode step reads (embedding, steps, norms, fp32 head), each storage once."""
        seen: dict[int, int] = {}

        def add(v) -> None:
            if isinstance(v, torch.Tensor):
                seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            elif isinstance(v, (list, tuple)):
                for u in v:
                    add(u)
            elif v is not None and hasattr(v, "mm"):  # a packed weight (model/packing.py)
                seen[id(v)] = nbytes(v)

        add([self.emb, self.norm_f, self.head_t])
        for _, norm, step in self.layers + [x for m in self.mtp_modules for x in m.layers]:
            add([norm] + list(vars(step).values()))
        for m in self.mtp_modules:
            add([m.enorm, m.hnorm, m.w_eh_t, m.final_norm])
        return sum(seen.values())

    refresh = _build  # rebuild the fused copies from the model's current weights

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
        """tokens (B, t) for cache rows 0..B-1 -> final-normed hidden states (B·t, H), row-major. n_keys = max(lengths)
        + t bounds the keys read, `uniform`: every row has the same length; n_keys None attends over the whole
        capacity with a mask, so every shape is fixed by (rows, max_seq_len): the compiled step's."""
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
