"""`nemotron3 sft` with the tool environment's conversations (stages/sft.py): included by default, counted in
summary.json, off with --no-tools, evaluated as greedy episodes after SFT; rows drawn in batches of one length
bucket and cut to their longest row (LengthBatches), whose loss equals the uncut batch's; the tokenizer sample of
`nemotron3 pretrain` holds tool-call text, so a tool conversation fits the default --seq-len."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, small_model
from rich.console import Console

from nemotron3.cli import main
from nemotron3.envs import lookup
from nemotron3.stages import pretrain
from nemotron3.stages.pretrain import PretrainConfig
from nemotron3.stages.sft import LengthBatches, SFTConfig
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint, sft_data
from nemotron3.train import data as train_data
from nemotron3.train.loss import token_ce_sum

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(400, seed=0) + lookup.texts(40, seed=0), vocab_size=600)


@pytest.fixture(scope="module")
def pretrained(tok, tmp_path_factory) -> Path:
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    return checkpoint.save(tmp_path_factory.mktemp("pretrained") / "final", model, tok)


def _run(pretrained: Path, out: Path, *extra: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["sft", "--model", str(pretrained), "--out", str(out), "--steps", "3", "--batch-size", "4",
                     "--conversations", "24", "--tool-share", "0.25", "--eval-problems", "0",
                     "--tool-eval-problems", "2", *extra])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_tool_conversations_are_in_by_default_and_off_with_no_tools(pretrained, tmp_path):
    on = _run(pretrained, tmp_path / "on")
    assert on["conversations"]["tools"] == 6 and on["conversations"]["tools_too_long"] == 0
    assert on["conversations"]["train"] == 24 + 6
    assert on["tools_after"]["problems"] == 2 and 0.0 <= on["tools_after"]["accuracy"] <= 1.0
    off = _run(pretrained, tmp_path / "off", "--no-tools")
    assert off["conversations"]["tools"] == 0 and off["conversations"]["train"] == 24 and off["tools_after"] == {}


def test_length_batches_cut_each_batch_and_keep_the_loss(tok):
    convs = sft_data.task_conversations(20, seed=0) + sft_data.tool_conversations(5, seed=0)
    rows = sft_data.build(convs, tok, 512, seed=0)
    data = LengthBatches(rows.data, batch_size=4)
    n = len(data)
    seen = torch.cat([data.order(e) for e in (0, 1)])
    assert sorted(seen[:n].tolist()) == list(range(n)) == sorted(seen[n:].tolist())  # a permutation per epoch
    assert not torch.equal(data.order(0), data.order(1))
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    model.eval()
    widths = []
    for pos in range(0, n, 4):
        idx = data.indices(pos, 4)
        cut, full = data.take(idx), rows.data.take(idx)
        widths.append(cut.inputs.shape[1])
        assert cut.mask.sum() == full.mask.sum()  # every trained target kept
        with torch.no_grad():
            a = token_ce_sum(model(cut.inputs), cut.targets, cut.mask)
            b = token_ce_sum(model(full.inputs), full.targets, full.mask)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)  # causal: the cut padding is never read (fp32 sums)
    lengths = torch.tensor([len(sft_data.encode(c, tok).ids) for c in convs])
    assert lengths[:20].max() < 200 < lengths[20:].min()
    assert min(widths) < 200 < max(widths)
    # an epoch's full batches (5 of task rows, 1 of tool rows) are of one kind; only the batches that take a bucket's
    # remainder or close an epoch may mix (shuffled rows would mix about 4 of the 6 batches that hold a tool row)
    mixed = [0] * 4
    for pos in range(0, 4 * n, 4):
        long = lengths[torch.tensor(data.indices(pos, 4))] > 200
        mixed[pos // n] += bool(long.any() and not long.all())
    assert max(mixed) <= 2, mixed


def test_pretrain_tokenizer_sample_holds_tool_calls():
    """A tool conversation with a tokenizer trained on pretrain's default sample fits SFT's default --seq-len."""
    tok, *_ = pretrain._corpus(PretrainConfig(steps=1), Console(quiet=True), None, 2048)
    longest = max(len(sft_data.encode(c, tok).ids) for c in sft_data.tool_conversations(20, seed=1))
    assert longest <= SFTConfig().seq_len + 1
