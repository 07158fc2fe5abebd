"""Models with projection biases (`mlp_bias`, `use_bias`) generate the tokens of their own full forward pass.

The biases are valid nemotron_h options (transformers builds them too) that the Nemotron 3 checkpoints do
not use; FastDecoder does not carry them, so the Engine must fall back to the reference cached path.
The reference here is independent of every cache: a greedy loop over `model(ids)`, one prompt at a time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.decode import FastDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    # Mamba in/out_proj, LatentMoE fc1/fc2_latent_proj and shared expert, attention; an MTP block (*E)
    "latent-mtp": dict(),
    # dense MLP layers and a plain MoE (no latent projections, the shared expert's biases act in H); MTP *E
    "dense-moe": dict(pattern="M-*E-", moe_latent_size=None),
}
PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]
NEW = 10


def biased_model(name: str, seed: int = 0) -> nemotron3.HybridLM:
    config = nemotron3.ModelConfig.preset("tiny").replace(mlp_bias=True, use_bias=True, **CONFIGS[name])
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config).eval()
    randomize_(model, seed)
    with torch.no_grad():  # randomize_ gives biases N(0, 1): that much in every layer swamps the residual stream
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.mul_(0.3)
    return model


@torch.no_grad()
def naive_greedy(model: nemotron3.HybridLM, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each the argmax of a full forward pass over everything so far (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    model = biased_model(request.param)
    return request.param, model, [naive_greedy(model, p, NEW) for p in PROMPTS]


def test_the_biases_exist_and_change_the_output(case):
    """Guards the other tests: a model whose biases did nothing would pass them however biases were handled."""
    name, model, _ = case
    biased = {n: m.bias for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    biases, kinds = list(biased.values()), {n.rsplit(".", 1)[-1] for n in biased}
    assert {"in_proj", "out_proj", "up_proj", "down_proj"} <= kinds
    if name == "latent-mtp":
        assert {"fc1_latent_proj", "fc2_latent_proj"} <= kinds
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        with_bias = model(ids)
        saved = [b.clone() for b in biases]
        for b in biases:
            b.zero_()
        without = model(ids)
        for b, s in zip(biases, saved):
            b.copy_(s)
    assert (with_bias - without).abs().max() > 0.1


def test_engine_falls_back_to_the_reference_path(case):
    _, model, _ = case
    assert not FastDecoder.supports(model)
    engine = nemotron3.Engine(model)
    assert engine.fast is None
    with pytest.raises(ValueError, match="without biases"):
        FastDecoder(model)


def test_greedy_tokens_equal_the_full_forward_one_prompt(case):
    _, model, want = case
    out = nemotron3.Engine(model).generate([PROMPTS[0]], NEW, stop_token_ids=[])
    assert out.tokens == [want[0]]
    assert out.stats["path"] == "reference"
    assert all(len(set(w)) > 3 for w in want), "a degenerate reference (a repeated token) would make a weak test"


@pytest.mark.parametrize("prefill_chunk", [2048, 16])
def test_greedy_tokens_equal_the_full_forward_batch(case, prefill_chunk):
    """Prompts of different lengths (right padding; with chunk 16, rows leave the prefill at different segments)."""
    _, model, want = case
    out = nemotron3.Engine(model, prefill_chunk=prefill_chunk).generate(PROMPTS, NEW, stop_token_ids=[])
    assert out.tokens == want


def test_speculative_tokens_equal_the_full_forward(case):
    _, model, want = case
    assert model.mtp is not None
    engine = nemotron3.Engine(model)
    for k in (1, 3):
        out = engine.generate(PROMPTS, NEW, stop_token_ids=[], num_speculative_tokens=k)
        assert out.tokens == want, f"num_speculative_tokens={k}"
        assert out.stats["drafted"] > 0
        single = engine.generate([PROMPTS[1]], NEW, stop_token_ids=[], num_speculative_tokens=k)
        assert single.tokens == [want[1]], f"num_speculative_tokens={k}, one prompt"
