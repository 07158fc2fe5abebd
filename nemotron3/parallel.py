"""Data parallelism on PyTorch's own engine: the process group, a DeviceMesh, FSDP2 applied to a built model,
and the few collectives the training loop needs besides the gradients' (metrics, checkpoints).

    torchrun --nproc-per-node 2 -m nemotron3.cli pretrain --batch-size 16            FSDP2 over 2 ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m nemotron3.cli ...

**Process group.** Joined when torchrun starts more than one process (WORLD_SIZE > 1): nccl when CUDA is
available (each process on the GPU `LOCAL_RANK`), gloo otherwise. One process (no torchrun, or torchrun with
one process) never touches torch.distributed, so a single-process run is the plain model, bit for bit.

**Mesh.** A 1-D DeviceMesh `("dp_shard",)` over all ranks: every rank reads its own rows of each global batch
(train/loop.py) and holds 1/N of every parameter, gradient and optimizer state. `--dp-shard` must equal the
world size (there is no replicate, tensor or pipeline dimension to give the other ranks to); 0 means the world
size. `--ep` (expert parallelism) is checked here and refused above 1: it is not built yet (docs/scaling.md §4).

**FSDP2.** `parallelize` calls `fully_shard` on each block of `backbone.layers`, then on the root (embeddings,
final norm, head and the MTP block, which runs once per depth with shared weights, so it stays gathered
through the step rather than being gathered once per depth). Each parameter becomes a DTensor sharded on
dim 0 (`Shard(0)`); a block's parameters are all-gathered just before its forward, freed after it, gathered
again for its backward, and its gradients are reduce-scattered as soon as that backward is done, which
overlaps with the backward of the blocks before it. `clip_grad_norm_` on DTensor gradients computes the norm of
the whole (global) gradient, so clipping and the NaN guard see the same number on every rank.

**A sum, not a mean.** The loop normalises every loss by the *global* batch's token counts (train/loss.py),
so the global gradient is the sum of the ranks' gradients. FSDP2 divides by the world size by default; the
divide factor is set to 1 with sum-only reductions (`ReduceOp.SUM`; gloo has no `PREMUL_SUM`), and a 2-rank
step computes the 1-rank step's gradient up to summation order.

**Mixed precision.** On CUDA with bf16 support: parameters all-gathered and used in bf16, gradients
reduce-scattered in fp32 (`MixedPrecisionPolicy(bf16, fp32)`), sharded master weights and AdamW states in
fp32. On CPU everything stays fp32 (gloo and the CPU kernels gain nothing from bf16, and the tests compare
against one fp32 process).

**Checkpoints** keep the one-process format, so they reshard for free: `full_state_dict` all-gathers the
weights onto rank 0 (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), `full_optimizer_state`
turns AdamW's sharded moments into the full tensors `optimizer.state_dict()` of one process holds, and
`load_optimizer_state` cuts a full state into this rank's shards (`distribute_tensor` with no source rank:
every rank reads the file and keeps its own piece). Saved by N ranks, a checkpoint loads in M ranks, in one
process and in `load_pretrained`. The cost: rank 0 holds the full weights in host memory while saving, and
every rank the full optimizer state while loading; torch.distributed.checkpoint's sharded format would avoid
that for models the size of Super, at the price of a second checkpoint format.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

DP_SHARD = "dp_shard"


def backend() -> str:
    """The collective backend for this machine: nccl with CUDA, gloo without."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) without one."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


@contextmanager
def process_group() -> Iterator[int]:
    """A stage's span in torchrun's process group, joined when launched with WORLD_SIZE > 1 (nccl on CUDA, gloo
    on CPU) and left at the end; yields this process's rank (0 without torchrun)."""
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if backend() == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend())
        joined = True
    try:
        yield rank_world()[0]
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def device() -> torch.device:
    """Where this rank computes: its GPU under nccl, else the CPU."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_layout(dp_shard: int, ep: int, world: int) -> tuple[int, int]:
    """(dp_shard, ep) for `world` ranks, 0 meaning "from the world size"; ValueError for a layout this
    implementation cannot run."""
    dp_shard = dp_shard or world
    ep = ep or 1
    if dp_shard != world:
        raise ValueError(f"--dp-shard {dp_shard} must equal the number of processes ({world}): there is no other "
                         "mesh dimension (replicate, tensor, pipeline) for the remaining ranks")
    if ep != 1:
        raise ValueError(f"--ep {ep}: expert parallelism is not implemented yet (docs/scaling.md §4); use --ep 1")
    return dp_shard, ep


def build_mesh(dp_shard: int = 0, ep: int = 0):
    """The DeviceMesh of the joined process group: 1-D, named `dp_shard`, over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    _, world = rank_world()
    dp_shard, _ = resolve_layout(dp_shard, ep, world)
    return init_device_mesh(device().type, (dp_shard,), mesh_dim_names=(DP_SHARD,))


def mixed_precision_policy():
    """bf16 parameters / fp32 reductions on a GPU with bf16, full fp32 otherwise (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device().type == "cuda" and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def is_sharded(model: nn.Module) -> bool:
    """Whether `parallelize` has been applied (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def parallelize(model: nn.Module, mesh, mp_policy=None) -> nn.Module:
    """Shard `model` (a HybridLM) in place with FSDP2 over `mesh`: each backbone block, then the root; gradients
    summed over ranks (divide factor 1). Returns the same module, now an FSDPModule."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mp_policy = mp_policy or mixed_precision_policy()
    model.to(device())
    units = list(model.backbone.layers)
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    if hasattr(model, "forward_mtp"):
        register_fsdp_forward_method(model, "forward_mtp")  # the MTP training forward gathers the root too
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM), no division after
    return model


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (a no-op in one process); returns `t`."""
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, on the CPU ({} on the other ranks); a collective when sharded. For
    an unsharded model, `model.state_dict()` itself."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered(model: nn.Module) -> nn.Module | None:
    """A plain, unsharded copy of a sharded HybridLM on rank 0 (None on the other ranks), for what runs on rank 0
    alone (saving, generation-based evaluation); `model` itself when it is not sharded. A collective when
    sharded. The copy is a plain HybridLM of the same config: precision conversions (NVFP4) are not re-applied."""
    if not is_sharded(model):
        return model
    from nemotron3.model import HybridLM

    weights = full_state_dict(model)
    if rank_world()[0] != 0:
        return None
    full = HybridLM(model.config)
    full.load_state_dict(weights)
    return full.train(model.training)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` with every sharded tensor all-gathered: the format one process saves (a collective on
    every rank when the parameters are sharded)."""
    sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones, never write into them
    sd["state"] = {i: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in per_param.items()}
                   for i, per_param in sd["state"].items()}
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state (as `full_optimizer_state` or one process saved it) into `opt`, whose
    parameters may be sharded: each full moment is cut to its parameter's placement on this rank."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {**state, "state": {i: dict(s) for i, s in state["state"].items()}}
    for i, per_param in state["state"].items():
        p = params[i]
        if not isinstance(p, DTensor):
            continue
        for k, v in per_param.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                per_param[k] = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                                 src_data_rank=None)
    opt.load_state_dict(state)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, by rank, on every rank ([obj] in one process)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()
