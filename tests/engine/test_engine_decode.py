"""FastDecoder (fused weights, in-place states) against the model's reference cached path, step by step."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HF_CONFIGS
from conftest import model_from_hf_config as build

import nemotron3
from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.eval.accuracy import greedy_generate_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def run_both(model, lens: list[int], steps: int = 6, seed: int = 0, traceable: bool = False, step_fn=None):
    """Prefill rows of lengths `lens` into two caches, then decode `steps` tokens with each path.

    traceable: the variant written for torch.compile, attending over the whole capacity (n_keys=None);
    step_fn: a replacement for its `step` (the compiled one)."""
    V, B = model.config.vocab_size, len(lens)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, max(lens)), generator=gen)
    toks = torch.randint(0, V, (B, steps), generator=gen)
    ref_cache = HybridCache(model.config, B, max(lens) + steps, include_mtp=False)
    fast_cache = HybridCache(model.config, B, max(lens) + steps, include_mtp=False)
    fast = FastDecoder(model, traceable=traceable)
    step = step_fn or fast.step
    ref_logits, fast_logits = [], []
    with torch.no_grad():
        for c in (ref_cache, fast_cache):
            model(ids, cache=c, valid=torch.tensor(lens))
        for j in range(steps):
            ref_logits.append(model(toks[:, j : j + 1], cache=ref_cache)[:, 0])
            n_keys = None if traceable else int(fast_cache.lengths.max()) + 1
            fast_logits.append(step(toks[:, j], fast_cache, n_keys, len(set(lens)) == 1))
            fast_cache.lengths += 1
    return torch.stack(ref_logits, 1), torch.stack(fast_logits, 1), ref_cache, fast_cache


@pytest.mark.parametrize("traceable", [False, True])
# B=1 gathers experts, B=6 runs them densely
@pytest.mark.parametrize("lens", [[9], [20, 20, 20, 20, 20, 20], [3, 17, 8]])
def test_fast_step_equals_the_reference_cached_step(tiny_hf_config, lens, traceable):
    name, cfg = tiny_hf_config
    model = build(cfg, seed=1)
    ref, fast, ref_cache, fast_cache = run_both(model, lens, traceable=traceable)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)
    assert_caches_close(ref_cache, fast_cache)


def assert_caches_close(ref_cache, fast_cache, atol=1e-5):
    """Every state of every layer: sequence states at the positions the rows hold, recurrent ones whole."""
    assert torch.equal(ref_cache.lengths, fast_cache.lengths)
    for i, specs in enumerate(ref_cache.specs):
        for name, spec in specs.items():
            want, got = ref_cache.state(i, name), fast_cache.state(i, name)
            if spec.kind == "sequence":
                for b, n in enumerate(ref_cache.lengths.tolist()):
                    torch.testing.assert_close(got[b, :, :n], want[b, :, :n], atol=atol, rtol=0)
            else:  # the states reach ~10, where 1e-5 is a few float eps
                torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)


def test_traceable_dense_experts_for_many_rows():
    """B·k > 4E: the compiled variant's dense expert path (every expert, weight 0 where not chosen)."""
    model = build(TINY_HF_CONFIGS["moe-1group"], seed=6)  # E = 8, k = 2: 20 rows make 40 > 32 pairs
    ref, fast, *_ = run_both(model, [5 + i % 7 for i in range(20)], steps=3, traceable=True)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


def test_t9_batch_paths_agree():
    model = build(nemotron3.ModelConfig.preset("t9").to_hf(), seed=2)
    for lens in ([70], [5, 9, 30, 31]):  # one row gathers 4 of 16 experts; four rows run all 16 densely
        ref, fast, *_ = run_both(model, lens, steps=4)
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_many_row_expert_paths_agree(padded, monkeypatch):
    """B·k >= E: experts grouped (one GEMM pair each) or padded into one batched matmul pair."""
    model = build(nemotron3.ModelConfig.preset("t9").to_hf(), seed=4)
    monkeypatch.setattr(FastDecoder, "_build", _with_padded_min_pairs(0 if padded else 10**9))
    ref, fast, *_ = run_both(model, [5 + 3 * i for i in range(9)], steps=3)  # 36 pairs over 16 experts
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


def _with_padded_min_pairs(n: int):
    build_ = FastDecoder._build

    def patched(self):
        build_(self)
        for _, _, step in self.layers:
            if hasattr(step, "padded_min_pairs"):
                step.padded_min_pairs = n
    return patched


def test_in_place_weight_updates_are_noticed():
    model = build(nemotron3.ModelConfig.preset("tiny").to_hf(), seed=3)
    fast = FastDecoder(model)
    assert not fast.is_stale()
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    assert fast.is_stale()
    fast.refresh()
    assert not fast.is_stale()
    ref, got, *_ = run_both(model, [4])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_unsupported_models_fall_back_to_the_reference_path():
    # fp16: a dtype the fast path does not decode (fp32 and bf16 it does, tests/engine/test_decode_bf16.py)
    model = build(nemotron3.ModelConfig.preset("tiny").to_hf()).to(torch.float16)
    assert not FastDecoder.supports(model)
    engine = nemotron3.Engine(model)
    assert engine.fast is None
    out = engine.generate([[1, 2, 3]], 3, stop_token_ids=[])
    assert out.stats["path"] == "reference"
    with torch.no_grad():  # the tokens of greedy decoding by full forwards (no cache), in the same fp16
        assert out.tokens[0] == greedy_generate_reference(model, [1, 2, 3], 3, set())


@pytest.mark.slow
def test_compiled_step_equals_the_reference_cached_step():
    """torch.compile of the traceable step (compiling takes far longer than the test itself, hence slow)."""
    model = build(nemotron3.ModelConfig.preset("tiny").to_hf(), seed=5)
    fast = FastDecoder(model, traceable=True)
    compiled = torch.compile(fast.step, dynamic=False)
    for lens in ([7], [4, 9]):
        ref, got, *_ = run_both(model, lens, traceable=True, step_fn=compiled)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_a_model_that_becomes_unsupported_falls_back():
    """Swapping a Linear for a subclass (what quantization does) must route decoding to the reference path."""

    class Marked(torch.nn.Linear):
        pass

    model = build(nemotron3.ModelConfig.preset("tiny").to_hf(), seed=7)
    engine = nemotron3.Engine(model)
    want = engine.generate([[1, 2, 3]], 4, stop_token_ids=[]).tokens
    old = model.lm_head
    model.lm_head = Marked(old.in_features, old.out_features, bias=False)
    model.lm_head.weight = old.weight
    out = engine.generate([[1, 2, 3]], 4, stop_token_ids=[])
    assert out.stats["path"] == "reference" and out.tokens == want
