"""Activation checkpointing (model/recompute.py, `HybridLM.set_activation_checkpointing`): the same gradients as
without it (float64, backbone and MTP depths, the expert-balance hooks active), fewer bytes saved for backward
(counted with saved_tensors_hooks), forward hooks seeing each forward once, and no effect on eval or cached
forwards."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from nemotron3.engine import Engine
from nemotron3.model.block import Block
from nemotron3.model.moe import MoE
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train import loop
from nemotron3.train.balance import ExpertBalance
from tests.conftest import tiny_mtp_model

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64


def _model(checkpointing: bool, dtype=torch.float64):
    model = tiny_mtp_model(VOCAB, seed=3).to(dtype).train()
    return model.set_activation_checkpointing(checkpointing)


def _ids(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, t + 1), generator=torch.Generator().manual_seed(seed))


def _step(model, ids: torch.Tensor):
    """One training forward + backward as the loop runs it: MTP at 2 depths, the balance hooks on, the
    sequence aux loss in the objective. Returns (gradients, per-layer loads, aux terms left after backward)."""
    balance = ExpertBalance(model, rate=1e-3, seq_aux_coeff=1e-2)
    balance.active = True
    logits, mtp = model.forward_mtp(ids[:, :-1], 2)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    for k, lk in enumerate(mtp, start=1):
        loss = loss + 0.3 * torch.nn.functional.cross_entropy(lk[:, :-k].flatten(0, 1), ids[:, 1 + k:].flatten())
    loss = loss + balance.take_aux_loss(2)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = {n: v.clone() for n, v in balance.loads.items()}
    left = len(balance.aux_terms)
    balance.remove()
    return grads, loads, left


@pytest.mark.parametrize("early_stop", [True, False])  # False: the recompute runs each block to its end
def test_gradients_equal_the_plain_ones_in_float64(early_stop):
    ids = _ids(80)
    plain, plain_loads, _ = _step(_model(False), ids)
    ckpt_model = _model(True)
    assert all(b.checkpointing for b in ckpt_model.modules() if isinstance(b, Block))
    with set_checkpoint_early_stop(early_stop):
        ckpt, ckpt_loads, left = _step(ckpt_model, ids)
    assert plain.keys() == ckpt.keys() and len(plain) > 50  # every block's parameters, MTP included
    for name, g in plain.items():
        scale = float(g.abs().max()) or 1.0
        torch.testing.assert_close(ckpt[name], g, rtol=0, atol=1e-12 * scale, msg=name)
    # a recompute is not a forward: the hooks counted each routed token once and collected no late aux term
    assert all(torch.equal(ckpt_loads[n], plain_loads[n]) for n in plain_loads)
    assert sum(int(v.sum()) for v in plain_loads.values()) > 0 and left == 0
    assert all(m.last_scores is None for m in ckpt_model.modules() if isinstance(m, MoE))


def _saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward during one training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, mtp = model.forward_mtp(ids[:, :-1], 2)
    del logits, mtp
    return sum(storages.values())


def test_far_fewer_bytes_are_saved_for_backward():
    ids = _ids(512)
    plain = _saved_bytes(_model(False, torch.float32), ids)
    ckpt = _saved_bytes(_model(True, torch.float32), ids)
    # what stays: the head and loss side (logits (2, 512, 64) fp32 per depth) and the embeddings; the blocks'
    # intermediates (Mamba in_proj outputs, SSD chunks, attention, expert activations) go
    assert ckpt < 0.35 * plain, (ckpt, plain)


def test_eval_and_cached_forwards_are_untouched():
    plain, ckpt = _model(False, torch.float32).eval(), _model(True, torch.float32).eval()
    prompt = [[5, 9, 3, 17, 22, 40, 1, 8]]
    a = Engine(plain, max_seq_len=64, fast=False).generate(prompt, 12, stop_token_ids=[])
    b = Engine(ckpt, max_seq_len=64, fast=False).generate(prompt, 12, stop_token_ids=[])
    assert a.tokens == b.tokens
    with torch.no_grad():
        torch.testing.assert_close(ckpt(_ids(40)[:, :-1]), plain(_ids(40)[:, :-1]), rtol=0, atol=0)  # same ops
    assert _model(True).set_activation_checkpointing(False).backbone.layers[0].checkpointing is False


def test_the_training_flag_checkpoints_and_trains_the_same(tmp_path):
    """`--activation-checkpointing` (TrainConfig) through the loop: the blocks are checkpointed, and 3 steps log the
    same losses and end at the same weights as without it (fp32, 1e-5: the same operations, recomputed)."""
    texts = [f"{i} plus {i + 1} is {2 * i + 1}." for i in range(200)]
    tok = Tokenizer.train(texts, vocab_size=300)
    data = train_data.build(tok, texts, seq_len=48, seed=0)
    runs = {}
    for on in (False, True):
        model = tiny_mtp_model(-(-tok.vocab_size // 64) * 64, seed=1).train()
        cfg = loop.TrainConfig(steps=3, batch_size=4, lr=3e-3, eval_every=1000, activation_checkpointing=on)
        loop.train(model, tok, data, cfg, tmp_path / str(on))
        assert all(b.checkpointing == on for b in model.modules() if isinstance(b, Block))
        losses = [json.loads(line)["loss"] for line in (tmp_path / str(on) / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        runs[on] = losses, [p.detach().clone() for p in model.parameters()]
    assert len(runs[True][0]) == 3
    for a, b in zip(runs[False][0], runs[True][0]):
        assert abs(a - b) <= 1e-5 * abs(a)
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
