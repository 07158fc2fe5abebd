"""Each mixer's fused decode step against the same mixer's `forward` with a cache, on the same inputs.

For every layer kind of the tiny model: random cached states (rows at different lengths), random normed
inputs x and residuals h for t = 1 and t = 3 new tokens, then `h + mixer.forward(x, cache)` through the
reference cache handle against `Step(h, x, cache)` through the fast decoder's handle; the outputs, the
states left behind and (with a recording cache) every recorded rollback state must agree.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.cache import HybridCache
from nemotron3.model.attention import AttentionStep
from nemotron3.model.mamba2 import Mamba2Step
from nemotron3.model.moe import MoEStep
from nemotron3.model.norms import MLPStep

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(config):
    return {
        "M": lambda m: Mamba2Step(m, config.layer_norm_epsilon),
        "*": AttentionStep,
        "E": lambda m: MoEStep(m, config),
        "-": MLPStep,
    }


@pytest.fixture(scope="module")
def model():
    config = nemotron3.ModelConfig.preset("tiny").replace(pattern="MEM*E-")
    torch.manual_seed(0)
    m = nemotron3.HybridLM(config).eval()
    randomize_(m, 0)
    return m


def _filled_caches(config, rows, rollback, gen):
    """Two identical caches with random states and rows of lengths 5, 9, 2."""
    caches = [HybridCache(config, rows, 32, max_rollback=rollback, include_mtp=False) for _ in range(2)]
    lengths = torch.tensor([5, 9, 2])
    for i, specs in enumerate(caches[0].specs):
        for name in specs:
            value = torch.randn(caches[0].state(i, name).shape, generator=gen)
            for c in caches:
                c.state(i, name).copy_(value)
    for c in caches:
        c.lengths.copy_(lengths)
    return caches


@pytest.mark.parametrize("kind", ["M", "*", "E", "-"])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("rollback", [0, 3])
def test_step_equals_forward(model, kind, t, rollback):
    config = model.config
    i = config.pattern.index(kind)
    mixer = model.backbone.layers[i].mixer
    gen = torch.Generator().manual_seed(hash((kind, t, rollback)) % 1000)
    ref, fast = _filled_caches(config, 3, rollback, gen)
    H = config.hidden_size
    x, h = torch.randn(3, t, H, generator=gen), torch.randn(3, t, H, generator=gen)
    with torch.no_grad():
        view = ref.begin(t)
        want = h + (mixer(x, view.layer(i)) if kind in "M*" else mixer(x))
        ref.commit(view)
        fview = fast.begin_all(t, int(fast.lengths.max()) + t, uniform=False)
        got = _steps(config)[kind](mixer)(h.reshape(3 * t, H), x.reshape(3 * t, H), fview.layer(i))
        fast.commit(fview)
    torch.testing.assert_close(got.view(3, t, H), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(ref.lengths, fast.lengths)
    for name, spec in ref.specs[i].items():
        a, b = ref.state(i, name), fast.state(i, name)
        if spec.kind == "sequence":
            for r, n in enumerate(ref.lengths.tolist()):
                torch.testing.assert_close(b[r, :, :n], a[r, :, :n], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            if rollback:
                torch.testing.assert_close(fast.history[i][name], ref.history[i][name], atol=1e-5, rtol=1e-5)
