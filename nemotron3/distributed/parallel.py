"""Data parallelism on PyTorch's own engine: the process group, a DeviceMesh, FSDP2 applied to a built model,
and the few collectives the training loop needs besides the gradients' (metrics, checkpoints).

    torchrun --nproc-per-node 2 -m nemotron3.cli pretrain --batch-size 16            FSDP2 over 2 ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m nemotron3.cli ...

**Process group.** Joined when torchrun starts more than one process (WORLD_SIZE > 1): nccl when CUDA is
available (each process on the GPU `LOCAL_RANK`), gloo otherwise. One process (no torchrun, or torchrun with
one process) never touches torch.distributed, so a single-process run is the plain model, bit for bit.

**Mesh.** A 1-D DeviceMesh `("dp_shard",)` over all N ranks: every rank reads its own rows of each global batch
(train/loop.py) and holds 1/N of every dense parameter, gradient and optimizer state. `--dp-shard` must equal
the world size (there is no replicate, tensor or pipeline dimension to give the other ranks to); 0 means the
world size. With `--ep M` (M divides N), a second, 2-D mesh `("efsdp", "ep")` of shape (N/M, M) over the same
ranks, consecutive ranks forming an `ep` group: each MoE layer's routed experts are partitioned over the M
ranks of a group (nemotron3/distributed/expert_parallel.py: E/M experts each, tokens moved by all-to-all), and each
partition is FSDP-sharded over the N/M ranks of `efsdp` that hold the same experts. So every rank still holds
1/N of the expert weights, but gathers only its E/M experts of a layer instead of all E, and an expert's
gradient is the sum over every token routed to it: the all-to-all's backward brings the gradients of the
group's tokens, FSDP's reduce-scatter over `efsdp` those of the other groups.

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

**Clipping with experts.** The dense and the expert gradients are DTensors on different meshes: the norm is
taken per mesh, the expert part summed over the `ep` group (each rank's experts are different parameters),
and every gradient scaled by the one factor (`clip_grad_norm_`).

**Checkpoints** keep the one-process format, so they reshard for free: `full_state_dict` all-gathers the
weights onto rank 0 (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), `full_optimizer_state`
turns AdamW's sharded moments into the full tensors `optimizer.state_dict()` of one process holds, and
`load_optimizer_state` cuts a full state into this rank's shards (`distribute_tensor` with no source rank:
every rank reads the file and keeps its own piece); expert tensors are gathered over the `ep` group, and cut to
the rank's experts, on top. Saved by N ranks, a checkpoint loads in M ranks, in one
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

from nemotron3.distributed.expert_parallel import ExpertParallelExperts, shard_experts

DP_SHARD, EFSDP, EP = "dp_shard", "efsdp", "ep"


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
        if joined:
            torch.distributed.barrier()  # leave together: no rank tears its groups down while rank 0 still writes
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
    if dp_shard % ep:
        raise ValueError(f"--ep {ep} does not divide --dp-shard {dp_shard}: expert-parallel groups are cut from the "
                         "data-parallel ranks")
    return dp_shard, ep


def build_mesh(dp_shard: int = 0, ep: int = 0):
    """The DeviceMeshes of the joined process group: the dense one, 1-D `dp_shard` over all ranks; and with
    ep > 1 the experts' one, 2-D `(efsdp, ep)` (else None)."""
    from torch.distributed.device_mesh import init_device_mesh

    _, world = rank_world()
    dp_shard, ep = resolve_layout(dp_shard, ep, world)
    dense = init_device_mesh(device().type, (dp_shard,), mesh_dim_names=(DP_SHARD,))
    experts = init_device_mesh(device().type, (dp_shard // ep, ep), mesh_dim_names=(EFSDP, EP)) if ep > 1 else None
    return dense, experts


def mixed_precision_policy():
    """bf16 parameters / fp32 reductions on a GPU with bf16, full fp32 otherwise (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device().type == "cuda" and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def is_sharded(model: nn.Module) -> bool:
    """Whether `parallelize` has been applied (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def expert_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    """(name, module) of every expert-parallel experts module of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def parallelize(model: nn.Module, meshes, mp_policy=None) -> nn.Module:
    """Shard `model` (a HybridLM) in place with FSDP2 over `meshes` (`build_mesh`): with an expert mesh, the
    routed experts first (partitioned over `ep`, each partition sharded over `efsdp`), then each backbone
    block, then the root; gradients summed over ranks (divide factor 1). Returns the same module, now an
    FSDPModule."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh, expert_mesh = meshes
    mp_policy = mp_policy or mixed_precision_policy()
    model.to(device())
    units = []
    if expert_mesh is not None:
        from nemotron3.model.moe import MoE

        if any("gemm_quantizer" in m.experts.__dict__ for m in model.modules() if isinstance(m, MoE)):
            raise ValueError("--ep with --nvfp4: the expert-parallel experts have no NVFP4 GEMM yet; use --ep 1")
        for experts in shard_experts(model, expert_mesh[EP].get_group()):
            fully_shard(experts, mesh=expert_mesh[EFSDP], mp_policy=mp_policy)
            units.append(experts)
    units += list(model.backbone.layers)
    for block in model.backbone.layers:
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


def clip_grad_norm_(model: nn.Module, params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of `params` to a global norm of `max_norm`; returns the norm before clipping. Without
    expert parallelism, `torch.nn.utils.clip_grad_norm_` itself; with it, the norm over both meshes (see the
    module docstring)."""
    experts = expert_modules(model)
    if not experts:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    expert_ids = {id(p) for _, m in experts for p in m.parameters()}
    dense = [p.grad for p in params if p.grad is not None and id(p) not in expert_ids]
    routed = [p.grad for p in params if p.grad is not None and id(p) in expert_ids]

    def squared(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), device=device())
        n = torch.nn.utils.get_total_norm(grads)
        return (n.full_tensor() if isinstance(n, DTensor) else n) ** 2

    routed_sq = squared(routed)
    torch.distributed.all_reduce(routed_sq, group=experts[0][1].group)
    total = float((squared(dense) + routed_sq).sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in dense + routed:
            g.mul_(coef)
    return total


def _gather_experts(local: torch.Tensor, module: ExpertParallelExperts) -> torch.Tensor:
    """All E experts' rows of an expert tensor, from each ep rank's E/ep (a collective over the ep group)."""
    local = (local.full_tensor() if isinstance(local, DTensor) else local).contiguous()
    parts = [torch.empty_like(local) for _ in range(module.ep)]
    torch.distributed.all_gather(parts, local, group=module.group)
    return torch.cat(parts).cpu()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, on the CPU ({} on the other ranks); a collective when sharded. For
    an unsharded model, `model.state_dict()` itself."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, m in expert_modules(model):
        for pname, p in m.named_parameters():
            full = _gather_experts(p, m)
            if sd:
                sd[f"{name}.{pname}"] = full
    return sd


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


def _expert_of_index(opt: torch.optim.Optimizer, model: nn.Module | None) -> dict[int, ExpertParallelExperts]:
    """Optimizer state index -> the expert-parallel module owning that parameter."""
    if model is None:
        return {}
    owner = {id(p): m for _, m in expert_modules(model) for p in m.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def full_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module | None = None) -> dict[str, Any]:
    """`opt.state_dict()` with every sharded tensor all-gathered (expert moments over the ep group of `model`
    too): the format one process saves (a collective on every rank when the parameters are sharded)."""
    experts = _expert_of_index(opt, model)
    sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones, never write into them

    def full(i: int, v: Any) -> Any:
        if i in experts and torch.is_tensor(v) and v.dim() > 0:
            return _gather_experts(v, experts[i])
        return v.full_tensor().cpu() if isinstance(v, DTensor) else v
    sd["state"] = {i: {k: full(i, v) for k, v in per_param.items()} for i, per_param in sd["state"].items()}
    return sd


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any], model: nn.Module | None = None) -> None:
    """Load a full optimizer state (as `full_optimizer_state` or one process saved it) into `opt`, whose
    parameters may be sharded: each full moment is cut to its parameter's placement on this rank (expert
    moments first to this rank's experts of `model`)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    experts = _expert_of_index(opt, model)
    state = {**state, "state": {i: dict(s) for i, s in state["state"].items()}}
    for i, per_param in state["state"].items():
        p = params[i]
        if not isinstance(p, DTensor):
            continue
        for k, v in per_param.items():
            if i in experts and torch.is_tensor(v) and v.dim() > 0:
                m = experts[i]
                v = per_param[k] = v[m.first: m.first + m.local]
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
