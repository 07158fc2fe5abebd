"""Expert parallelism (nemotron3/distributed/expert_parallel.py) with 2 gloo processes started by torchrun.

References: the same MoE layer whole on every rank (`Experts`, itself checked against its token-by-token
`forward_reference` in tests/model/test_moe.py): outputs, input gradients and expert gradients (summed over the
ranks' tokens); the bytes each rank must send, counted from the routing itself (copies whose expert lives on
the other rank, times the expert width, times 4 bytes in fp32); and hidden/latent for the LatentMoE saving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron3.distributed.expert_parallel import dispatch_bytes_per_token

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ep")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("ep_worker.py")), str(out)], env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"ep-{r}.json").read_text()) for r in range(2)]


def test_expert_parallel_moe_equals_the_whole_layer(results):
    for r in results:
        for kind in ("latent", "standard"):
            got = r[kind]
            assert got["y"] <= 1e-6 and got["x_grad"] <= 1e-6, (kind, got)
            assert got["up_grad"] <= 1e-5 and got["down_grad"] <= 1e-5, (kind, got)
            assert got["idle_experts"] > 0  # the uneven routing left some experts without rows: that path ran too


def test_dispatch_bytes_are_the_routings_and_latent_moves_hidden_over_latent_times_fewer(results):
    for r in results:
        assert r["same_routing"]
        for kind in ("latent", "standard"):
            got = r[kind]
            assert got["dispatch_bytes"] == got["expected_dispatch"] > 0
            assert got["combine_bytes"] == got["expected_combine"] > 0
        ratio = r["hidden"] / r["latent_size"]
        assert r["standard"]["dispatch_bytes"] == ratio * r["latent"]["dispatch_bytes"]
        assert r["standard"]["combine_bytes"] == ratio * r["latent"]["combine_bytes"]
    # what one rank sends is what the other receives back with the outputs
    assert results[0]["latent"]["dispatch_bytes"] == results[1]["latent"]["combine_bytes"]


def test_computed_dispatch_bytes_for_super():
    """Super: 22 of 512 experts, hidden 4096, latent 1024, bf16: over 8 ranks 7/8 of the copies leave."""
    b = dispatch_bytes_per_token(4096, 1024, 22, 8)
    assert b["standard"] == 2 * 22 * 7 / 8 * 4096 * 2 and b["latent"] == 2 * 22 * 7 / 8 * 1024 * 2
    assert b["ratio"] == 4
