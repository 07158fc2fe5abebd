"""The engine, speculative decoding, the trainer and the quant codecs with the model on a GPU, against the CPU on
the same weights (issue 31). Every test but the benchmark's smoke test (`slow`, on the CPU) is marked `gpu`:

    ./test.sh -m gpu                               # on a machine with CUDA (skipped without it)
    NEMOTRON3_TEST_DEVICE=cpu ./test.sh -m gpu     # the same tests on the CPU: a smoke test of the tests
    NEMOTRON3_TEST_DEVICE=cuda:1 ./test.sh -m gpu  # another GPU

What is compared, and how closely:
- greedy tokens and seeded sampled tokens: equal. The sampling streams are drawn on the host for every device
  (engine/sampling.py), so a seed gives the same uniforms on CPU and CUDA; only a near-tie of two logits (or of
  a uniform and a CDF step) could part them, which these random models do not have at this length;
- speculative (k = 1..3) against plain greedy on the same device: equal tokens (speculation is lossless);
- a training step: loss within 1e-4 relative and the gradient norm within 1e-3 relative of the CPU's, fp32 (the
  GPU sums in another order; TF32 is off by default in torch for fp32 matmuls). Two optimizer steps of the
  training loop (`train`): each logged loss within 1e-3 relative (the second step reads the first's update);
- the codecs (NVFP4, NVFP4-W4A16, FP8, MX9/6/4, MXFP4): bit-identical encodings (elementwise arithmetic, IEEE
  division and rounding on both devices).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

from nemotron3.engine import Engine
from nemotron3.options import resolve_device
from tests.conftest import TINY_PROMPTS, gpu_test_device, randomize_, small_model, tiny_mtp_model

gpu = pytest.mark.gpu  # on every test but the benchmark's smoke test (slow, always on the CPU)


@pytest.fixture(scope="module")
def device() -> torch.device:
    """$NEMOTRON3_TEST_DEVICE (default cuda), resolved as `--device` is (a CUDA device this machine lacks: the
    conftest hook has skipped these tests already)."""
    return resolve_device(gpu_test_device())


@pytest.fixture(scope="module")
def models(device):
    """The tiny MTP model on the CPU and the same weights on `device`."""
    cpu = tiny_mtp_model(seed=3)
    return cpu, copy.deepcopy(cpu).to(device)


def _tokens(model, **kw) -> list[list[int]]:
    return Engine(model).generate(TINY_PROMPTS, 12, stop_token_ids=[], **kw).tokens


@gpu
def test_the_model_is_on_the_device(models, device):
    _, on = models
    assert {p.device for p in on.parameters()} == {device}


@gpu
def test_forward_logits_match_the_cpu(models, device):
    cpu, on = models
    ids = torch.tensor([TINY_PROMPTS[0]])
    with torch.no_grad():
        want, got = cpu(ids), on(ids.to(device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@gpu
def test_greedy_tokens_match_the_cpu(models):
    cpu, on = models
    assert _tokens(on, num_speculative_tokens=0) == _tokens(cpu, num_speculative_tokens=0)


@gpu
def test_seeded_sampling_matches_the_cpu(models):
    cpu, on = models
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, seed=11, num_speculative_tokens=0)
    assert _tokens(on, **kw) == _tokens(cpu, **kw)


@gpu
@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_equals_plain_greedy_on_the_device(models, k):
    _, on = models
    assert _tokens(on, num_speculative_tokens=k) == _tokens(on, num_speculative_tokens=0)


@gpu
def test_generate_command_on_the_device_matches_the_cpu(models, device, tmp_path):
    """`nemotron3 generate --device D`: the CLI path (open_folder's load onto D) gives the CPU's tokens."""
    from nemotron3 import save_pretrained
    from nemotron3.cli import main

    save_pretrained(models[0], tmp_path)

    def run(dev: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["generate", "--model", str(tmp_path), "--ids", "5,6,7,8", "--max-new-tokens", "8",
                         "--no-stop", "--device", dev]) == 0
        return out.getvalue()

    assert run(str(device)) == run("cpu")


# ----------------------------------------------------------------------------------------- training


def _batch(vocab: int, rows: int = 4, length: int = 48, seed: int = 0):
    from nemotron3.train.data import PackedData

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length + 1), generator=g)
    return PackedData(ids, torch.ones_like(ids, dtype=torch.bool), seed)


@gpu
def test_a_training_step_matches_the_cpu(device):
    from nemotron3.train.loss import Normalizer, micro_loss

    cpu = small_model(256, seed=1)
    randomize_(cpu, 1)
    on = copy.deepcopy(cpu).to(device)
    b = _batch(256).batch(0, 4)
    norm = Normalizer.of(b.mask, 2)
    results = []
    for model, dev in ((cpu, torch.device("cpu")), (on, device)):
        model.train()
        mb = type(b)(b.inputs.to(dev), b.targets.to(dev), b.mask.to(dev))
        ml = micro_loss(model, mb, norm, 2, 0.3)
        ml.total.backward()
        grad = torch.nn.utils.clip_grad_norm_(list(model.parameters()), float("inf"))
        results.append((float(ml.total.detach()), float(grad)))
    (loss_cpu, grad_cpu), (loss_dev, grad_dev) = results
    assert loss_dev == pytest.approx(loss_cpu, rel=1e-4)
    assert grad_dev == pytest.approx(grad_cpu, rel=1e-3)


@gpu
def test_the_training_loop_on_the_device_matches_the_cpu(device, tmp_path):
    """`train` (what pretrain and sft run) with the model on the device: the batches and the held-out rows follow
    the model, and the logged losses are the CPU run's."""
    from nemotron3.train.loop import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, eval_every=2, log_every=100, lr=1e-3)
    base = small_model(256, seed=2)
    randomize_(base, 2)
    data, heldout = _batch(256, rows=8, seed=1), _batch(256, rows=2, seed=2)
    logs = []
    for name, dev in (("cpu", torch.device("cpu")), ("dev", device)):
        torch.manual_seed(0)
        model = copy.deepcopy(base).to(dev)
        result = train(model, None, data, cfg, tmp_path / name, heldout, console=_quiet_console())
        assert {p.device for p in model.parameters()} == {dev}
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logs.append(([r["loss"] for r in records if "loss" in r], result.eval_losses))
    (cpu_losses, cpu_eval), (dev_losses, dev_eval) = logs
    assert len(dev_losses) == 2 and dev_losses == pytest.approx(cpu_losses, rel=1e-3)
    assert [s for s, _ in dev_eval] == [s for s, _ in cpu_eval]
    assert [v for _, v in dev_eval] == pytest.approx([v for _, v in cpu_eval], rel=1e-3)


def _quiet_console():
    from rich.console import Console

    return Console(file=io.StringIO())


# ----------------------------------------------------------------------------------------- codecs


@gpu
def test_nvfp4_quantize_is_bit_identical_to_the_cpu(device):
    from nemotron3.quant.nvfp4 import nvfp4_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows across six decades
    for block_2d in (False, True):
        want, got = nvfp4_quantize(x, block_2d=block_2d), nvfp4_quantize(x.to(device), block_2d=block_2d)
        assert torch.equal(got.packed.cpu(), want.packed), block_2d
        assert torch.equal(got.scales.cpu().view(torch.uint8), want.scales.view(torch.uint8)), block_2d


@gpu
@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4-w4a16", "fp8", "mx9", "mx6", "mx4", "mxfp4"])
def test_checkpoint_encodings_are_bit_identical_to_the_cpu(scheme, device):
    """What `nemotron3 quantize --device D` writes: each weight's disk tensors, encoded on D, equal the CPU's."""
    from nemotron3.quant.checkpoint import encode_weight

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g) * 0.05
    want, got = encode_weight(scheme, w), encode_weight(scheme, w.to(device))
    assert want.keys() == got.keys()
    for key in want:
        a, b = want[key], got[key].cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if a.is_floating_point() and a.element_size() == 1:  # fp8 values and scales: compare their bytes
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), (scheme, key)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_the_cpu(tmp_path):
    """`benchmarks/gpu.py --device cpu --quick`: the smoke test of the benchmark (one JSON, one table, every row
    measured or skipped with a reason, speculation's tokens identical to plain greedy)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu" and result["machine"]["bandwidth_bytes_s"] > 0
    rows = result["rows"]
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    sections = {r["section"] for r in rows if "value" in r}
    assert {"decode", "prefill", "mtp", "train"} <= sections, sections
    for r in rows:
        if r["section"] in ("decode", "prefill", "train"):
            assert r["value"] > 0 and r["bound"] > 0 and r["of_bound"] == pytest.approx(r["value"] / r["bound"])
        if r["section"] == "mtp":
            assert r["identical"], r
    assert "tok/s" in proc.stdout and "of bound" in proc.stdout
