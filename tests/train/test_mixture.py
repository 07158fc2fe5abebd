"""Weighted mixtures in phases (train/mixture.py, issue 32 item 4): realised token shares against the weights, the
phase switch at its step, resume across the switch, and summary.json's data_shares.

Reference: each source's documents are made of one token id of their own, so which source a counted target token
belongs to is read off the rows themselves (a `</s>` target belongs to the document of the input token before
it), independently of the mixture's own bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemotron3.cli import main
from nemotron3.stages.pretrain import PretrainConfig
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train import mixture

BOS, EOS, PAD = 1, 2, 0
SEQ = 32


def _source(token: int, n_docs: int, length: int) -> list[list[int]]:
    """Documents of one token id, lengths cycling around `length` (so rows differ in their masked tokens)."""
    return [[token] * (1 + (length + 5 * i) % (2 * length)) for i in range(n_docs)]


# token id -> (documents): sizes chosen so that some source is smaller than its share over 2,000 rows (it repeats)
SOURCES = {"a": _source(10, 60, 40), "b": _source(11, 400, 6), "c": _source(12, 30, 120), "d": _source(13, 90, 20)}
TOKEN = {"a": 10, "b": 11, "c": 12, "d": 13}


def _mixed(phases: list[list[tuple[str, float]]], starts: list[int], seed: int = 0) -> mixture.MixedData:
    """A MixedData of SOURCES (one component per source) with the given phases, built by hand."""
    names = list(SOURCES)
    parts, spans, lo = [], [], 0
    for k, name in enumerate(names):
        rows, mask, tokens = mixture.pack_labelled(SOURCES[name], [k] * len(SOURCES[name]), len(names), SEQ,
                                                   BOS, EOS, PAD)
        parts.append((rows, mask, tokens))
        spans.append((lo, lo + rows.shape[0]))
        lo += rows.shape[0]
    ph = []
    for k, (blend, start) in enumerate(zip(phases, starts)):
        total = sum(w for _, w in blend)
        ph.append(mixture.Phase(f"phase{k + 1}", start, [n for n, _ in blend],
                                [(names.index(n), w / total) for n, w in blend if w > 0]))
    return mixture.MixedData(*(torch.cat([p[i] for p in parts]) for i in range(3)), names, spans, ph, seed)


def _counted(batch: train_data.Batch) -> dict[str, int]:
    """Counted target tokens per source, read off the token ids (the reference)."""
    owner = torch.where(batch.targets == EOS, batch.inputs, batch.targets)[batch.mask]
    return {name: int((owner == tok).sum()) for name, tok in TOKEN.items()}


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("blend", [[("a", 0.7), ("b", 0.3)], [("a", 0.5), ("b", 0.3), ("c", 0.15), ("d", 0.05)],
                                   [("c", 0.2), ("d", 0.8)]])
def test_token_shares_over_2000_rows_are_within_one_percent_of_the_weights(blend, seed):
    data = _mixed([blend], [0], seed)
    got = _shares(_counted(data.batch(0, 2000)))
    for name, w in blend:
        assert abs(got[name] - w) <= 0.01, (name, got[name], w)
    assert sum(got[n] for n, _ in blend) == pytest.approx(1.0)
    assert data.shares(2000)["phase1"] == pytest.approx({n: got[n] for n, _ in blend}, abs=1e-6)
    # the share holds over every prefix of whole steps too, not only at the end (the deficit rule's bound)
    for end in (200, 800):
        prefix = _shares(_counted(data.batch(0, end)))
        assert all(abs(prefix[n] - w) <= 0.01 for n, w in blend)


def test_a_source_smaller_than_its_share_repeats_and_a_zero_weight_source_is_never_drawn():
    data = _mixed([[("a", 0.5), ("c", 0.5), ("d", 0.0)]], [0])
    reps = data.repeats(2000)
    assert set(reps) == {0, 2} and all(r > 1 for r in reps.values())  # a and c are far smaller than 1,000 rows
    got = _counted(data.batch(0, 2000))
    assert got["d"] == 0 and got["b"] == 0
    # a repeated source runs through all its rows before any repeats (epochs)
    lo, hi = data.spans[0]
    first = [i for i in data.indices(0, 2000) if lo <= i < hi][:hi - lo]
    assert sorted(first) == list(range(lo, hi))


def test_phase_two_rows_start_exactly_at_the_switch_step():
    batch, switch_step = 8, 150  # a 300-step run with --phase2-at 0.5
    data = _mixed([[("a", 0.6), ("b", 0.4)], [("c", 0.5), ("b", 0.5)]], [0, switch_step * batch])
    before, after = data.batch(0, switch_step * batch), data.batch(switch_step * batch, 150 * batch)
    cb, ca = _counted(before), _counted(after)
    assert cb["c"] == 0 and cb["d"] == 0 and ca["a"] == 0 and ca["d"] == 0
    last, first = data.batch((switch_step - 1) * batch, batch), data.batch(switch_step * batch, batch)
    assert _counted(last)["a"] > 0 and _counted(first)["c"] > 0  # the step before is phase 1's, the step at is 2's
    for counts, blend in ((cb, {"a": 0.6, "b": 0.4}), (ca, {"c": 0.5, "b": 0.5})):
        got = _shares(counts)
        assert all(abs(got[n] - w) <= 0.01 for n, w in blend.items()), got
    shares = data.shares(300 * batch)
    assert shares["phase1"] == pytest.approx({n: _shares(cb)[n] for n in ("a", "b")}, abs=1e-6)
    assert shares["phase2"] == pytest.approx({n: _shares(ca)[n] for n in ("c", "b")}, abs=1e-6)
    # b is one source in both phases: phase 2 continues its epoch order instead of restarting it
    lo, hi = data.spans[1]
    b_rows = [i for i in data.indices(0, 300 * batch) if lo <= i < hi]
    assert sorted(b_rows[:hi - lo]) == list(range(lo, hi))
    assert PretrainConfig(steps=300, phase2_at=0.5, phase2_data=["tasks"]).phase2_step == 150
    assert PretrainConfig(steps=10, phase2_at=0.85, phase2_data=["tasks"]).phase2_step == 9  # 8.5 rounds up


def test_a_resumed_mixture_sees_the_uninterrupted_rows_across_the_switch():
    batch = 4
    blends, starts = [[("a", 0.7), ("d", 0.3)], [("c", 0.5), ("b", 0.25), ("a", 0.25)]], [0, 40 * batch]
    whole = _mixed(blends, starts, seed=3)
    order = [whole.indices(s * batch, batch) for s in range(100)]  # step by step, as the loop asks
    for resume_step in (30, 40, 55):  # before, at and after the switch: a fresh process starts there
        resumed = _mixed(blends, starts, seed=3)
        assert [resumed.indices(s * batch, batch) for s in range(resume_step, 100)] == order[resume_step:]
        assert resumed.fingerprint() == whole.fingerprint()
    assert _mixed(blends, [0, 41 * batch], seed=3).fingerprint() != whole.fingerprint()  # another switch: refused
    assert _mixed(blends, starts, seed=4).indices(0, 400) != whole.indices(0, 400)


def test_a_single_pool_is_packed_data_bit_for_bit():
    """Without weights or phases (the default run), the rows, order and fingerprint are those of before."""
    texts = train_data.task_texts(60, seed=0)
    tok = Tokenizer.train(texts, 300)
    data, held = mixture.assemble(tok, [[mixture.Source(mixture.TASKS)]], [0], {mixture.TASKS: texts}, texts[:5],
                                  SEQ, 7, 0.02)
    plain = train_data.build(tok, texts, SEQ, 7)
    assert torch.equal(data.rows, plain.rows) and torch.equal(data.mask, plain.mask)
    assert data.indices(0, 3 * len(plain)) == plain.indices(0, 3 * len(plain))
    assert data.fingerprint() == plain.fingerprint()
    assert torch.equal(held.rows, train_data.build(tok, texts[:5], SEQ, 7).rows)


ARGS = ["--steps", "10", "--batch-size", "4", "--seq-len", "32", "--eval-every", "100", "--eval-problems", "0",
        "--tokenizer-sample", "200", "--vocab-size", "300"]


def _corpus(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    a, c = folder / "a.jsonl", folder / "c"
    a.write_text("".join(json.dumps({"text": f"alpha beta {i} " * (3 + i % 5)}) + "\n" for i in range(120)))
    c.mkdir(exist_ok=True)
    (c / "notes.txt").write_text("gamma delta epsilon. " * 400)
    return a, c


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_logs_each_phase_share_and_resumes_across_the_switch_bit_for_bit(tmp_path):
    a, c = _corpus(tmp_path / "data")
    mix = ["--data", f"{a}:0.7", "tasks:0.3", "--phase2-at", "0.5", "--phase2-data", f"{c}/:0.5", "tasks:0.5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["pretrain", *ARGS, *mix, "--save-every", "4", "--keep-last", "0", "--out", str(whole)]) == 0
    summary = json.loads((whole / "summary.json").read_text())
    shares = summary["data_shares"]
    assert list(shares) == ["phase1", "phase2"]
    assert set(shares["phase1"]) == {str(a), "tasks"} and set(shares["phase2"]) == {f"{c}/", "tasks"}
    # 20 rows a phase: the deficit rule keeps each share within one row's tokens of its weight
    for phase, want in (("phase1", {str(a): 0.7, "tasks": 0.3}), ("phase2", {f"{c}/": 0.5, "tasks": 0.5})):
        assert sum(shares[phase].values()) == pytest.approx(1.0, abs=1e-5)
        assert all(abs(shares[phase][n] - w) <= 1 / 20 for n, w in want.items()), shares
    lines = [r for r in _records(whole) if "data_shares" in r]
    assert lines == [{"step": 5, "phase": "phase1", "data_shares": shares["phase1"]},
                     {"step": 10, "phase": "phase2", "data_shares": shares["phase2"]}]
    # resume from step 4, before the switch at step 5: every later step the same, bit for bit
    resumed.mkdir()
    import shutil

    shutil.copytree(whole / "step-000004", resumed / "step-000004")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(whole) if r["step"] <= 4
                                                   and "loss" in r))
    assert main(["pretrain", "--out", str(resumed), "--resume"]) == 0

    def steps(out: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"], r["tokens"]) for r in _records(out) if "loss" in r]

    assert steps(resumed) == steps(whole)
    assert json.loads((resumed / "summary.json").read_text())["data_shares"] == shares
    weights = "final/model.safetensors"
    assert (resumed / weights).read_bytes() == (whole / weights).read_bytes()
    assert [r for r in _records(resumed) if "data_shares" in r] == lines


def test_the_default_run_reports_its_one_source(tmp_path):
    out = tmp_path / "o"
    assert main(["pretrain", *ARGS, "--steps", "2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["data_shares"] == {"phase1": {"tasks": 1.0}}


def test_a_source_smaller_than_its_share_is_repeated_with_a_warning(tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"tiny note {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "o"
    assert main(["pretrain", *ARGS, "--steps", "4", "--data", f"{small}:0.5", "tasks:0.5", "--out", str(out)]) == 0
    said = capsys.readouterr()
    warnings = [ln for ln in (said.out + said.err).splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and str(small) in warnings[0] and "repeat" in warnings[0], warnings
    shares = json.loads((out / "summary.json").read_text())["data_shares"]["phase1"]
    assert set(shares) == {str(small), "tasks"} and all(abs(s - 0.5) <= 1 / 16 for s in shares.values())
