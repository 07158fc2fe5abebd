"""Expert parallelism: a MoE layer's routed experts partitioned over the ranks of a group, tokens dispatched
to the rank that holds their expert and combined back with all-to-all (docs/scaling.md §2).

With `ep` ranks and E experts, rank r holds experts [r·E/ep, (r+1)·E/ep). The router, the shared expert and
the LatentMoE projections stay whole on every rank; only `Experts` is replaced, by `ExpertParallelExperts`,
which takes the same (x, idx, w) and returns the same (y, tokens per expert):

    1. sort the N·k (token, slot) pairs by expert: that also groups them by destination rank
    2. all-to-all the per-expert counts, so each rank knows how many rows it receives per (source, expert)
    3. all-to-all the rows x (N·k, ℓ) (dispatch); regroup the received rows by local expert
    4. run each local expert on its rows; undo the regrouping
    5. all-to-all the outputs back (combine); weight by the router's w and add into the tokens, in fp32

ℓ is the width the experts read: `moe_latent_size` under LatentMoE (1024 for Super), else `hidden_size`
(4096), because the latent down-projection runs *before* dispatch and the up-projection *after* combine.
So each routed copy of a token moves ℓ values each way, and LatentMoE moves hidden/latent times fewer
bytes. `DispatchStats` counts the bytes each rank sends to other ranks (its own chunk of an all-to-all
moves nothing) in both all-to-alls, so the saving is measured, not assumed (benchmarks/dispatch.py).

The all-to-alls are `torch.distributed.nn.functional.all_to_all_single`, which has a backward (the reverse
all-to-all), so gradients flow to the tokens' ranks and to the experts' ranks alike.

Training uses it through `--ep` (distributed/parallel.py): the experts module of each layer becomes its own FSDP2
unit on the experts' mesh; clipping and checkpoints gather over the `ep` group there. The NVFP4 expert GEMM
(`Experts.gemm_quantizer`) is not carried over: `--ep` with `--nvfp4` is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from nemotron3.model.moe import Experts, relu2

# the differentiable all-to-all is the one torch.distributed.nn keeps; its replacement in _functional_collectives
# is a private module
warnings.filterwarnings("ignore", message=r".*all_to_all_single is deprecated", category=FutureWarning)


@dataclass
class DispatchStats:
    """Bytes this rank sent to other ranks, per all-to-all kind, summed over the forwards since reset."""

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    tokens: int = 0  # tokens (not copies) whose routing was dispatched
    calls: list[int] = field(default_factory=list)  # rows sent off-rank per forward

    def reset(self) -> None:
        self.dispatch_bytes = self.combine_bytes = self.tokens = 0
        self.calls = []


class ExpertParallelExperts(nn.Module):
    """This rank's E/ep experts of an `Experts` module, reached by all-to-all over `group`."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = experts.num_experts
        if E % self.ep:
            raise ValueError(f"{E} experts do not split over {self.ep} expert-parallel ranks")
        self.num_experts, self.local = E, E // self.ep
        lo = self.rank * self.local
        self.first = lo
        self.up_proj = nn.Parameter(experts.up_proj.detach()[lo: lo + self.local].clone())  # (E/ep, I, ℓ)
        self.down_proj = nn.Parameter(experts.down_proj.detach()[lo: lo + self.local].clone())  # (E/ep, ℓ, I)
        self.stats = DispatchStats()

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, ℓ), idx (N, k) global expert ids, w (N, k) -> y (N, ℓ) and this rank's tokens per expert (E,)."""
        N, k = idx.shape
        flat = idx.reshape(-1)  # (N·k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,) over all experts, from this rank's tokens
        token = order // k
        xs = x.index_select(0, token)  # (N·k, ℓ), grouped by expert, hence by destination rank
        send = counts.view(self.ep, self.local)  # (ep, E/ep): rows for rank r's j-th expert
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # (ep, E/ep): rows from rank r for j
        send_sizes, recv_sizes = send.sum(1).tolist(), recv.sum(1).tolist()
        got = all_to_all_single(xs.new_empty(sum(recv_sizes), xs.shape[1]), xs, recv_sizes, send_sizes, self.group)
        # regroup the received rows (source-major) by local expert (expert-major), stably
        src_expert = torch.arange(self.local, device=x.device).repeat(self.ep)  # (ep·E/ep,) expert of each block
        by_expert = src_expert.repeat_interleave(recv.reshape(-1)).argsort(stable=True)
        rows = got.index_select(0, by_expert)
        sizes = recv.sum(0).tolist()  # rows per local expert
        outs = [relu2(rows_e @ self.up_proj[e].T) @ self.down_proj[e].T if sizes[e] else rows_e[:0]
                for e, rows_e in enumerate(rows.split(sizes))]
        back = torch.empty_like(by_expert).index_put_((by_expert,), torch.arange(len(by_expert), device=x.device))
        done = torch.cat(outs).index_select(0, back) if outs else rows
        ys = all_to_all_single(xs.new_empty(xs.shape[0], done.shape[1]), done, send_sizes, recv_sizes, self.group)
        ys = ys.float() * w.reshape(-1)[order, None]
        y = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, ys)
        off_rank = sum(send_sizes) - send_sizes[self.rank]
        returned = sum(recv_sizes) - recv_sizes[self.rank]
        self.stats.dispatch_bytes += off_rank * xs.shape[1] * xs.element_size()
        self.stats.combine_bytes += returned * done.shape[1] * done.element_size()
        self.stats.tokens += N
        self.stats.calls.append(off_rank)
        return y.to(x.dtype), counts


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[ExpertParallelExperts]:
    """Replace every MoE layer's `experts` in `model` by this rank's expert-parallel share; returns them."""
    from nemotron3.model.moe import MoE

    out = []
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts = ExpertParallelExperts(m.experts, group)
            out.append(m.experts)
    return out


def dispatch_bytes_per_token(hidden: int, latent: int | None, top_k: int, ep: int, bytes_per_value: int = 2) -> dict:
    """Bytes a token's routed copies move off-rank per MoE layer, dispatch + combine, if its top_k experts are
    uniformly spread over `ep` ranks ((ep-1)/ep of the copies leave the rank): standard MoE moves `hidden`
    values per copy each way, LatentMoE `latent`."""
    off = top_k * (ep - 1) / ep
    standard = 2 * off * hidden * bytes_per_value
    out = {"standard": standard}
    if latent is not None:
        out["latent"] = 2 * off * latent * bytes_per_value
        out["ratio"] = standard / out["latent"]
    return out
