"""Shared test fixtures: tiny random configs and transformers reference models."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*register_constant.*")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, saying so, on a machine without it (issue 31)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA, and torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _keep_subnormals():
    """`nemotron3.cli.main` and `run()` flush subnormal floats process-wide; a test that calls them in-process must
    not change the arithmetic of the tests after it (the codec tests check subnormal cases against torchao)."""
    yield
    torch.set_flush_denormal(False)

# Tiny nemotron_h configs (Hugging Face field names) covering every layer kind and routing variant.
TINY_HF_CONFIGS = {
    "moe-1group": dict(
        hybrid_override_pattern="M*ME", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5, vocab_size=256,
    ),
    "latent-2groups": dict(
        hybrid_override_pattern="MEM*E*ME", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=16,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, moe_latent_size=24, routed_scaling_factor=5.0, vocab_size=200,
    ),
    "dense-mlp": dict(
        hybrid_override_pattern="M-*M-", hidden_size=48, num_attention_heads=2, num_key_value_heads=2, head_dim=24,
        mamba_num_heads=4, mamba_head_dim=12, ssm_state_size=8, n_groups=2, chunk_size=16, intermediate_size=96,
        vocab_size=128,
    ),
    "grouped-routing": dict(
        hybrid_override_pattern="*EM-ME*", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=16,
        n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16, moe_latent_size=16, intermediate_size=40, vocab_size=96,
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every tensor a random value, router weights and correction biases included.

    transformers' init leaves the correction bias at zero and norms at one, which hides routing and
    normalisation bugs; here everything moves. Scales keep activations O(1) so differences stay visible.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith(("norm.weight", "norm_f.weight")):
            p.copy_(1.0 + 0.2 * r)
        elif name.endswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15 + 1))
        elif name.endswith("dt_bias"):
            p.copy_(-3.0 + 1.5 * r)
        elif name.endswith(("D", "conv1d.bias")):
            p.copy_(r)
        elif name.endswith("gate.weight"):
            p.copy_(r / p.shape[-1] ** 0.5)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            if name.endswith("conv1d.weight"):
                fan_in = p.shape[-1]
            p.copy_(r / fan_in**0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def icdf(weights: list[float], u: float) -> int:
    """The first token whose cumulative weight exceeds u * total: the inverse-CDF draw the engine documents for
    one uniform u (a plain-Python reference for the speculative tests)."""
    total, acc = sum(weights), 0.0
    for i, w in enumerate(weights):
        acc += w
        if acc > u * total:
            return i
    return len(weights) - 1


class StubTokenizer:
    """Stands in for a tokenizer in checkpoint tests: `save(folder)` writes an empty tokenizer.json."""

    def save(self, folder) -> None:
        (folder / "tokenizer.json").write_text("{}")


@pytest.fixture(params=sorted(TINY_HF_CONFIGS))
def tiny_hf_config(request) -> tuple[str, dict]:
    return request.param, TINY_HF_CONFIGS[request.param]
