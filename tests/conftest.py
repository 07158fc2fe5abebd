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


GPU_TEST_DEVICE_ENV = "NEMOTRON3_TEST_DEVICE"  # the device the `gpu` tests run on (default cuda; cpu: a smoke test)


def gpu_test_device() -> str:
    """What the `gpu`-marked tests run on: $NEMOTRON3_TEST_DEVICE, else `cuda`."""
    return os.environ.get(GPU_TEST_DEVICE_ENV) or "cuda"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, saying so, on a machine without it (issue 31), unless
    NEMOTRON3_TEST_DEVICE names the CPU (`NEMOTRON3_TEST_DEVICE=cpu ./test.sh -m gpu`: the same tests as a smoke
    test). The marker itself is looked up, not the keywords, which also hold test names and parameter ids."""
    if torch.cuda.is_available() or not gpu_test_device().startswith("cuda"):
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA, and torch.cuda.is_available() is False "
                            f"({GPU_TEST_DEVICE_ENV}=cpu runs them on the CPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
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


@pytest.fixture
def one_thread():
    """Decode-sized ops gain nothing from a second thread, and on a machine whose cores are busy with other work every
    OpenMP barrier waits for the slowest thread; restored after each test. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_from_hf_config(hf_cfg: dict, seed: int = 0):
    """A HybridLM built from a transformers-style config dict, eval mode, with randomize_'s weights."""
    import nemotron3

    config = nemotron3.ModelConfig.from_hf(dict(hf_cfg, model_type="nemotron_h"))
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config).eval()
    randomize_(model, seed)
    return model


def tiny_mtp_model(vocab: int | None = None, seed: int = 0):
    """The `tiny` preset (it has an MTP block, *E), eval mode, randomize_'s weights; `vocab` overrides vocab_size."""
    import nemotron3

    config = nemotron3.ModelConfig.preset("tiny")
    if vocab is not None:
        config = config.replace(vocab_size=vocab)
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config).eval()
    randomize_(model, seed)
    return model


TINY_PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]  # three prompts of uneven lengths


def small_model(vocab: int, seed: int = 0):
    """A narrower `tiny` (hidden 64, 8 experts): what a pretraining run's final/ looks like, fast to train."""
    import dataclasses

    from nemotron3 import HybridLM, ModelConfig

    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=vocab, hidden_size=64, num_attention_heads=2,
                              head_dim=32, mamba_num_heads=4, moe_latent_size=32, n_routed_experts=8)
    return HybridLM(cfg)


def tiny_moe_config(**kw):
    """One LatentMoE layer (pattern E) small enough to check against a per-token loop."""
    from nemotron3 import ModelConfig

    base = dict(pattern="E", hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=24, moe_latent_size=12, routed_scaling_factor=2.5, vocab_size=10)
    base.update(kw)
    return ModelConfig(**base)


EVAL_TEXT = "What is 7 * 6? It is 42. The answer is B. Paris is the capital of France.\n"


def eval_checkpoint(folder, seed: int = 0, text: str = EVAL_TEXT):
    """A tiny random model (no MTP) saved with nemotron3's own tokenizer trained on `text` (the chat format's special
    tokens included): what the eval, chat and generate tests open. Returns (model in eval mode, tokenizer)."""
    import nemotron3
    from nemotron3.tokenizer import Tokenizer

    tk = Tokenizer.train([text] * 50, vocab_size=300)
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=tk.tk.get_vocab_size(), num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config)
    randomize_(model, seed)
    nemotron3.save_pretrained(model, folder)
    tk.save(folder)
    return model.eval(), tk


def wait_for_checkpoint(proc, out, step: int, timeout: float = 300) -> None:
    """Until `out` holds the training state of `step` (the torchrun kill-and-resume tests), while `proc` runs."""
    import time

    from nemotron3.train import checkpoint

    t0 = time.time()
    while time.time() - t0 < timeout:
        if (checkpoint.step_dir(out, step) / checkpoint.STATE_FILE).is_file():
            return
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {step} in {timeout} s")


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (torchrun's ranks)."""
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]
