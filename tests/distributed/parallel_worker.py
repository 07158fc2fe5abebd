"""Run under torchrun by tests/distributed/test_parallel.py: two training steps of the tiny model sharded with
FSDP2, then the loop's own checkpoint save (train/loop.py `_save`), then each rank's local shards of every parameter
and AdamW moment, written to `shards-RANK.pt` beside the checkpoint: the ground truth the saved files are checked
against.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/parallel_worker.py OUT [EP]

With EP = 2 the routed experts are partitioned over the two ranks (nemotron3/distributed/expert_parallel.py), and the
off-rank rows they dispatched are written too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console

from nemotron3.config import ModelConfig
from nemotron3.distributed import parallel
from nemotron3.model import HybridLM
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train.loop import _save
from nemotron3.train.loss import Normalizer, micro_loss
from nemotron3.train.optim import build_optimizer


def main(out: Path, ep: int) -> None:
    with parallel.process_group() as rank:
        torch.manual_seed(0)
        texts = train_data.task_texts(300, 0)
        tokenizer = Tokenizer.train(texts, 300)
        data = train_data.build(tokenizer, texts, 32, 0)
        config = ModelConfig.load("tiny").replace(vocab_size=320, bos_token_id=tokenizer.bos_id,
                                                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        model = HybridLM(config)
        parallel.parallelize(model, parallel.build_mesh(0, ep))
        opt = build_optimizer(model, 1e-3)
        world = parallel.rank_world()[1]
        for step in range(2):
            batch = data.batch(4 * step, 4)
            mine = batch.split(4 // world)[rank]
            micro_loss(model, mine, Normalizer.of(batch.mask, 1), 1, 0.3).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _save(model, opt, tokenizer, out / "step-000002", {"step": 2, "data_position": 8}, 0)
        # the clipping norm against the sum of squares of every rank's local pieces (each element on one rank)
        batch = data.batch(8, 4)
        micro_loss(model, batch.split(4 // world)[rank], Normalizer.of(batch.mask, 1), 1, 0.3).total.backward()
        norms = {}
        for part, keep in (("all", lambda n: True), ("experts", lambda n: ".experts." in n)):
            params = [p for n, p in model.named_parameters() if keep(n)]
            sq = sum(float(p.grad.to_local().double().pow(2).sum()) for p in params)
            ref = torch.tensor(sq, dtype=torch.float64)
            torch.distributed.all_reduce(ref)
            norms[part] = (parallel.clip_grad_norm_(model, params, float("inf")), float(ref.sqrt()))
        opt.zero_grad(set_to_none=True)
        names = {id(p): n for n, p in model.named_parameters()}
        shards = {"params": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
                  "moments": {names[id(p)]: {k: v.to_local().clone() for k, v in s.items() if k != "step"}
                              for p, s in opt.state.items()},
                  "dispatched": sum(sum(m.stats.calls) for _, m in parallel.expert_modules(model)),
                  "norms": norms}
        torch.save(shards, out / f"shards-{rank}.pt")
        Console(stderr=True).print(f"rank {rank} of {world}: saved")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
