"""Quantized weights kept packed at runtime: resident weight bytes follow the format, not fp32.

A weight-only quantized checkpoint (NVFP4 W4A16, MXFP4, MX9/6/4, FP8; ModelOpt NVFP4 / FP8) decoded on load takes
fp32 (or bf16) memory. `PackedLinear` and `PackedExperts` keep the checkpoint's own tensors (codes and scales)
instead and compute with them: `packed_matmul` decodes a tile of output rows at a time into a small buffer
(`TILE_ELEMENTS` values) and multiplies the input by it, so at most one tile is ever dense. Each tile decodes
exactly as the whole weight would (the decoders are elementwise per row: every row's codes and block scales
are its own, and a per-tensor scale is shared), so a packed layer multiplies by the very weights the
dequantize-on-load path holds; only the fp32 summation order of the matmul may differ (BLAS blocks a matrix of
a tile's rows differently from the whole one).

A `PackedWeight` is one (out, in) weight, or a stack (E, out, in) of them for the routed experts: `rowwise`
tensors lead with the output rows (after the expert axis), `shared` ones are per-tensor scales of shape (1,)
per weight; `decode(tensors) -> fp32 (rows, in)` is the scheme's decoder, passed in explicitly by the
checkpoint reader (quant/checkpoint.py, quant/modelopt.py, called by nemotron3/checkpoint/schemes.py).

The layers are inference-only: a forward in training mode and a backward through them raise
NotImplementedError (load with `dequantize=True` to train or take gradients). `state_dict()` writes the decoded
dense weights under the usual names, so a packed model saves as the dense model it computes with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemotron3.hf import split_expert
from nemotron3.model.moe import Experts

__all__ = ["TILE_ELEMENTS", "PackedWeight", "PackedLinear", "PackedExperts", "packed_matmul", "resident_bytes",
           "is_packed", "INFERENCE_ONLY", "settle_experts", "install"]

TILE_ELEMENTS = 1 << 18          # values decoded at once (1 MiB in fp32)
Decoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]
INFERENCE_ONLY = ("{what} holds packed quantized weights and is inference-only; load the checkpoint with "
                  "load_pretrained(..., dequantize=True) to train or take gradients")


@dataclass
class PackedWeight:
    """The tensors of one packed weight (or a stack of them), its dense shape and its decoder."""

    scheme: str
    rowwise: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    decode: Decoder

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.rowwise.items()
        yield from self.shared.items()

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of a 2-D weight, decoded to fp32."""
        return self.decode({**{k: v[lo:hi] for k, v in self.rowwise.items()}, **self.shared})

    def dequantize(self) -> torch.Tensor:
        """The whole weight (or stack), decoded to fp32."""
        if len(self.shape) == 2:
            return self.rows(0, self.shape[0])
        return torch.stack([self.expert(e).dequantize() for e in range(self.shape[0])])

    def expert(self, e: int) -> PackedWeight:
        """Weight e of a stack, as views."""
        return PackedWeight(self.scheme, {k: v[e] for k, v in self.rowwise.items()},
                            {k: v[e] for k, v in self.shared.items()}, self.shape[1:], self.decode)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> PackedWeight:
        """The same weight over other tensors of the same names (a module's buffers after `.to()`)."""
        return PackedWeight(self.scheme, {k: tensors[k] for k in self.rowwise}, {k: tensors[k] for k in self.shared},
                            self.shape, self.decode)

    @staticmethod
    def stack(parts: list[PackedWeight]) -> PackedWeight:
        """E weights of one scheme and shape as one (E, out, in) stack."""
        first = parts[0]
        return PackedWeight(first.scheme, {k: torch.stack([p.rowwise[k] for p in parts]) for k in first.rowwise},
                            {k: torch.stack([p.shared[k] for p in parts]) for k in first.shared},
                            (len(parts), *first.shape), first.decode)


class _PackedMatmul(torch.autograd.Function):
    """y = x · Wᵀ (+ b) with W decoded tile by tile; no backward (inference-only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: PackedWeight, dtype: torch.dtype, bias: torch.Tensor | None,
                what: str) -> torch.Tensor:
        ctx.what = what
        out_f, in_f = w.shape
        x2 = x.reshape(-1, in_f)
        y = torch.empty((x2.shape[0], out_f), dtype=x.dtype, device=x.device)
        step = max(1, TILE_ELEMENTS // max(in_f, 1))
        for lo in range(0, out_f, step):
            hi = min(lo + step, out_f)
            y[:, lo:hi] = F.linear(x2, w.rows(lo, hi).to(dtype))
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(INFERENCE_ONLY.format(what=ctx.what))


def packed_matmul(x: torch.Tensor, w: PackedWeight, dtype: torch.dtype, bias: torch.Tensor | None = None,
                  what: str = "a layer") -> torch.Tensor:
    """x (..., in) · Wᵀ for a packed 2-D weight, the weight decoded to `dtype` one tile of rows at a time."""
    return _PackedMatmul.apply(x, w, dtype, bias, what)


def _register(module: nn.Module, prefix: str, w: PackedWeight) -> None:
    for k, t in w.tensors():
        module.register_buffer(f"{prefix}{k}", t, persistent=False)


def _buffers(module: nn.Module, prefix: str, w: PackedWeight) -> PackedWeight:
    return w.with_tensors({k: getattr(module, f"{prefix}{k}") for k, _ in w.tensors()})


class PackedLinear(nn.Linear):
    """An nn.Linear whose weight stays packed; `dtype` is the dtype the dense path would hold the weight in.

    A subclass of nn.Linear so that code asking "is this a projection" still finds it, but not a plain one:
    the fused decoder (engine/decode.py, `FastDecoder.supports`) runs models with these on the reference path.
    """

    def __init__(self, w: PackedWeight, bias: torch.Tensor | None, dtype: torch.dtype, name: str = "") -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = w.shape
        self.dtype, self.name, self._spec = dtype, name, w
        _register(self, "q_", w)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        raise AttributeError(f"{self.name or 'this PackedLinear'} keeps its weight packed: call .dequantize()")

    @property
    def packed(self) -> PackedWeight:
        return _buffers(self, "q_", self._spec)

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise NotImplementedError(INFERENCE_ONLY.format(what=self.name or "a PackedLinear"))
        return packed_matmul(x, self.packed, self.dtype, self.bias, self.name or "a PackedLinear")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self._spec.scheme}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantize()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{self.name or 'a PackedLinear'} is packed: load a checkpoint into a model loaded "
                                  "with dequantize=True")


class _Stack:
    """What `Experts.forward` reads as `up_proj` / `down_proj`: unbind(0) gives the packed weight of each expert."""

    def __init__(self, w: PackedWeight) -> None:
        self.w = w
        self.shape = torch.Size(w.shape)

    def unbind(self, dim: int = 0) -> list[PackedWeight]:
        return [self.w.expert(e) for e in range(self.shape[0])]

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.w.expert(e).dequantize()


class _PackedGemm:
    """The Experts `gemm_quantizer` of a packed container: each expert GEMM through `packed_matmul`. Being set,
    it also tells the fused decoder (`FastDecoder.supports`) to leave the model to the reference path."""

    def __init__(self, owner: PackedExperts) -> None:
        self.owner = owner

    def gemm(self, x: torch.Tensor, w: torch.Tensor | PackedWeight) -> torch.Tensor:
        if isinstance(w, PackedWeight):
            return packed_matmul(x, w, self.owner.dtype, None, self.owner.name or "packed experts")
        return F.linear(x, w)


class PackedExperts(Experts):
    """Routed experts with `up_proj` / `down_proj` each a packed (E, out, in) stack or a dense 3-D tensor."""

    def __init__(self, up: PackedWeight | torch.Tensor, down: PackedWeight | torch.Tensor, dtype: torch.dtype,
                 name: str = "") -> None:
        nn.Module.__init__(self)
        self.num_experts = up.shape[0]
        self.dtype, self.name = dtype, name
        self._specs: dict[str, PackedWeight] = {}
        for proj, w in (("up_proj", up), ("down_proj", down)):
            if isinstance(w, PackedWeight):
                self._specs[proj] = w
                _register(self, f"{proj}_", w)
            else:
                self.register_parameter(f"{proj}_dense", nn.Parameter(w, requires_grad=False))
        self.gemm_quantizer = _PackedGemm(self)

    def _proj(self, proj: str) -> _Stack | torch.Tensor:
        if proj in self._specs:
            return _Stack(_buffers(self, f"{proj}_", self._specs[proj]))
        return getattr(self, f"{proj}_dense")

    @property
    def up_proj(self) -> _Stack | torch.Tensor:  # type: ignore[override]
        return self._proj("up_proj")

    @property
    def down_proj(self) -> _Stack | torch.Tensor:  # type: ignore[override]
        return self._proj("down_proj")

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            raise NotImplementedError(INFERENCE_ONLY.format(what=self.name or "packed experts"))
        return super().forward(x, idx, w)

    def dense(self, proj: str) -> torch.Tensor:
        """The (E, out, in) weight of `up_proj` or `down_proj`, decoded to the model's dtype."""
        if proj in self._specs:
            return _buffers(self, f"{proj}_", self._specs[proj]).dequantize().to(self.dtype)
        return getattr(self, f"{proj}_dense")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for proj in ("up_proj", "down_proj"):
            t = self.dense(proj)
            destination[prefix + proj] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{self.name or 'packed experts'} are packed: load a checkpoint into a model loaded "
                                  "with dequantize=True")


def is_packed(module: nn.Module) -> bool:
    """True for a module that keeps its weights packed (these layers are inference-only)."""
    return isinstance(module, (PackedLinear, PackedExperts))


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, packed weights included), a tensor shared
    by two modules (tied embeddings) counted once: what the weights take in memory, as opposed to on disk."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            key = (str(t.device), t.data_ptr())
            seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


def _expert_groups(names: Iterator[str] | list[str]) -> dict[tuple[str, str], list[str]]:
    """(experts module, projection) -> the disk names of its expert weights, in expert order."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for n in names:
        expert = split_expert(n) if n.endswith(".weight") else None  # nemotron3/hf.py's per-expert disk names
        if expert:
            experts, e, proj = expert
            groups.setdefault((experts, proj), {})[e] = n
    return {k: [v[e] for e in sorted(v)] for k, v in groups.items()}


def settle_experts(packed: dict[str, PackedWeight], dense: dict[str, torch.Tensor],
                   shapes: dict[str, tuple[int, ...]]) -> None:
    """A stack of experts stays packed only if every expert of it is packed in one scheme; otherwise (a mixed
    checkpoint) its packed experts are decoded into `dense`, in place."""
    wanted = _expert_groups(list(shapes))
    for key, names in _expert_groups(list(packed)).items():
        parts = [packed.get(n) for n in wanted.get(key, [])]
        if len(names) == len(parts) and all(p is not None and p.scheme == parts[0].scheme for p in parts):
            continue
        for n in names:
            dense[n] = packed.pop(n).dequantize()


def install(model: nn.Module, packed: dict[str, PackedWeight], dtype: torch.dtype,
            device: torch.device | None = None) -> None:
    """Swap the modules whose weights `packed` holds (disk names) for PackedLinear / PackedExperts computing in
    `dtype`; a stack's other projection, if dense, is taken from the loaded module."""
    if not packed:
        return
    stacks: dict[str, dict[str, PackedWeight]] = {}
    for (fqn, proj), names in _expert_groups(list(packed)).items():
        stacks.setdefault(fqn, {})[proj] = PackedWeight.stack([packed[n] for n in names])
    experts = {n for names in _expert_groups(list(packed)).values() for n in names}
    for name, w in packed.items():
        if name in experts:
            continue
        fqn = name.removesuffix(".weight")
        old = model.get_submodule(fqn)
        bias = None if old.bias is None else old.bias.detach()
        _replace(model, fqn, PackedLinear(w, bias, dtype, fqn).to(device))
    for fqn, projs in stacks.items():
        old = model.get_submodule(fqn)
        up, down = (projs[p] if p in projs else getattr(old, p).detach() for p in ("up_proj", "down_proj"))
        _replace(model, fqn, PackedExperts(up, down, dtype, fqn).to(device))


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, leaf = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
