"""The long-context CPT data (train/long_context.py) against a plain-Python solver: every question of a training
document is answered by the list, the loss mask covers exactly the questions, rows hold whole documents."""

from __future__ import annotations

import random

import pytest

from nemotron3 import tasks
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import long_context as lc


def solve_all(text: str) -> list[tuple[str, str, str]]:
    """The reference: (asked key, written value, value in the list) for every question, with str methods."""
    lines = text.split("\n")
    table, i = {}, 1
    while not lines[i].startswith("What is the value of "):
        k, v = lines[i].split(": ")
        table[k] = v
        i += 1
    out = []
    while i < len(lines):
        asked = lines[i].removeprefix("What is the value of ").removesuffix("?")
        assert lines[i + 1] == "<think>" and lines[i + 3] == "</think>" and lines[i + 2] == f"{asked}: {lines[i + 4]}"
        out.append((asked, lines[i + 4], table[asked]))
        i += 5
    return out


@pytest.fixture(scope="module")
def tok():
    texts = [lc.retrieval_document(random.Random(i), 6, 3) for i in range(40)] + [p.text() for p in tasks.mixture(60)]
    return Tokenizer.train(texts, vocab_size=300)


@pytest.mark.parametrize("pairs,questions", [(1, 1), (4, 4), (16, 8), (64, 5)])
def test_every_question_is_answered_by_its_list(pairs, questions):
    rng = random.Random(pairs)
    for _ in range(20):
        text = lc.retrieval_document(rng, pairs, questions)
        answers = solve_all(text)
        assert len(answers) == questions and len({k for k, _, _ in answers}) == questions
        assert all(written == true for _, written, true in answers)
        first = text.split("\n<think>")[0]  # the family's problem: train split, and the reward agrees
        assert tasks.reward([first], [text[len(first) + 1:].split("\nWhat is")[0]]) == [1.0]
        fam, params = tasks.family_of(first)
        assert tasks.split_of(fam.key(params)) == "train" and len(params[0]) == pairs
    with pytest.raises(ValueError, match="questions must be in 1..pairs=3"):
        lc.retrieval_document(rng, 3, 4)


def test_the_loss_covers_the_questions_and_not_the_list(tok):
    text = lc.retrieval_document(random.Random(0), 8, 4)
    doc = lc.masked_document(tok, text)
    assert doc.ids == tok.encode(text)
    on = [i for i, m in zip(doc.ids, doc.mask) if m]
    off = [i for i, m in zip(doc.ids, doc.mask) if not m]
    assert doc.mask == sorted(doc.mask)  # one cut: list first, then questions
    assert tok.decode(on) == text[text.index("What is the value of "):]
    assert tok.decode(off) == text[:text.index("What is the value of ")]


def test_rows_hold_whole_documents_and_replay_is_its_share(tok):
    phase = lc.Phase(pairs=6, questions=3, seq_len=200, steps=5, batch_size=4, lr=1e-3)
    rows, mask = lc.retrieval_rows(tok, phase, 6, seed=0)
    assert rows.shape == (6, 201) and not mask[:, 0].any()
    for r, m in zip(rows.tolist(), mask.tolist()):
        starts = [j for j, t in enumerate(r) if t == tok.bos_id]
        ends = [j for j, t in enumerate(r) if t == tok.eos_id]
        assert starts and len(starts) == len(ends) and starts[0] == 0
        for s, e in zip(starts, ends):
            answers = solve_all(tok.decode(r[s + 1:e]))
            assert answers and all(w == t for _, w, t in answers)
        assert all(t == tok.pad_id and not mm for t, mm in zip(r[ends[-1] + 1:], m[ends[-1] + 1:]))
        assert m[ends[-1]]  # </s> is a target, as in pretraining
    data = lc.phase_data(tok, phase, seed=0, replay=0.25)
    assert data.rows.shape == (20, 201)
    assert sum(tok.bos_id in r and "Remember" not in tok.decode(r) for r in data.rows.tolist()) == 5
    with pytest.raises(ValueError, match="more than a row of 100"):
        lc.retrieval_rows(tok, lc.Phase(16, 8, 100, 1, 1, 1e-3), 1, 0)
