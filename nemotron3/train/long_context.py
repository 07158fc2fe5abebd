"""The long-context CPT recipe as data: retrieval training documents with many questions, and the phases.

A retrieval problem (tasks/retrieval.py) has ~5 learnable tokens (the recalled value) in a document of
hundreds to thousands of random ones, so a CPT phase on one-question documents sees too few retrieval targets
in ten minutes of a CPU to form the lookup (docs/results.md, *Long context*). A *training* document here is the
family's problem text (list, first question, trace, answer: exactly what the evaluation reads and writes) followed
by more questions about other keys of the same list, each with its trace and answer:

    Remember each key's value.
    qbxe: 0417
    mzak: 9120
    What is the value of mzak?
    <think>
    mzak: 9120
    </think>
    9120
    What is the value of qbxe?
    <think>
    ...

Every question is a supervised retrieval under the plain next-token loss of `nemotron3 pretrain`; each trace
repeats the asked key right before the value, the induction pattern (`key: ` seen earlier, copy what followed).

**Loss on the answers only.** Each document's loss mask is 1 from the first question on (questions, traces,
answers) and 0 on the header and the list: the list is random, so its ~2.3–3.3 nats a token are pure gradient
noise, and with them (the plain loss of `nemotron3 pretrain` on a text file) the lookup did not form in 340
steps; without them it forms in ~150 steps of 4-pair documents (docs/results.md, *Long context*).

**Phases** (`PHASES`, a length curriculum): 4 pairs in rows of 256 until the lookup forms, then 16 pairs, then
64 pairs in rows of 2,048, then 280 in rows of 4,096 (two phases), each phase starting from the previous one's
weights with a fresh schedule (warmup, stable, decay) and optimizer, as `pretrain --init-from`. Rows hold whole
documents (greedily filled, padding under a zero mask), so no question loses its list to a row boundary. A `replay`
share of rows are the six reasoning families' documents (full loss) against forgetting. `cpt` runs the phases through
the training loop (train/loop.py: schedule, clipping, MTP, aux loss, metrics.jsonl) and writes each `final/`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from nemotron3 import checkpoint, tasks
from nemotron3.tasks.registry import split_of
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import loop
from nemotron3.train.data import Document, PackedData, pack, task_texts

FAMILY = "retrieval"


@dataclass(frozen=True)
class Phase:
    """One CPT phase: documents of `pairs` lines and `questions` questions, rows of `seq_len` tokens."""

    pairs: int
    questions: int
    seq_len: int
    steps: int
    batch_size: int
    lr: float


# The chain measured on 1 thread of the shared 2-core machine (docs/results.md, Long context, 2026-12-04): 469 s of
# training steps in all, ~5k tokens/s in rows of 256, ~2.7k in rows of 4,096.
PHASES = (Phase(4, 4, 256, 250, 16, 3e-3), Phase(16, 8, 512, 120, 8, 2e-3), Phase(64, 32, 2048, 40, 8, 1e-3),
          Phase(280, 24, 4096, 20, 4, 1e-3), Phase(280, 24, 4096, 40, 4, 1e-3))


def question_block(key: str, value: str) -> str:
    """One more question after a problem text: the question line, the trace and the answer, as Problem.text()."""
    return f"What is the value of {key}?\n<think>\n{key}: {value}\n</think>\n{value}"


def retrieval_document(rng: random.Random, pairs: int, questions: int, split: str = "train") -> str:
    """A list of `pairs` key–value lines and `questions` (≤ pairs) questions about distinct keys of it.

    The first question makes the family's problem, drawn until it falls in `split` (registry.split_of, so no
    training document starts with a held-out problem); the others follow it as `question_block`s."""
    if not 1 <= questions <= pairs:
        raise ValueError(f"retrieval document: questions must be in 1..pairs={pairs}, got {questions}")
    family = tasks.FAMILIES[FAMILY]
    for _ in range(1000):
        kv, _ = family.draw(rng, pairs)
        order = rng.sample(range(pairs), questions)
        params = (kv, kv[order[0]][0])
        if split_of(family.key(params)) == split:
            break
    else:  # pragma: no cover - a split holds about half of all problems
        raise ValueError(f"retrieval document: no {split} problem in 1000 draws")
    return "\n".join([family.problem(params).text(), *(question_block(*kv[i]) for i in order[1:])])


def masked_document(tokenizer: Tokenizer, text: str) -> Document:
    """A retrieval document's ids with the loss on everything from its first question on (not the list).

    The two parts are tokenized apart at the newline before the first question (no merge crosses a newline
    in this tokenizer's documents, so the ids are the whole text's)."""
    cut = text.index("\nWhat is the value of ") + 1
    head, tail = tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])
    return Document(head + tail, [0] * len(head) + [1] * len(tail))


def retrieval_rows(tokenizer: Tokenizer, phase: Phase, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` rows (rows, seq_len + 1) of whole masked documents, greedily filled, `<s> ids </s>` each, padding
    under a zero mask; and their target masks (column 0 never a target, as train/data.pack)."""
    rng = random.Random(f"long-context/{phase.pairs}/{phase.questions}/{seed}")
    width = phase.seq_len + 1
    ids = torch.full((rows, width), tokenizer.pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((rows, width), dtype=torch.bool, device="cpu")
    pending: Document | None = None
    for r in range(rows):
        used = 0
        while True:
            doc = pending or masked_document(tokenizer, retrieval_document(rng, phase.pairs, phase.questions))
            pending = None
            n = len(doc.ids) + 2
            if n > width:
                raise ValueError(f"long-context phase: a document of {phase.pairs} pairs and {phase.questions} "
                                 f"questions takes {n} tokens, more than a row of {phase.seq_len}")
            if used + n > width:
                pending = doc
                break
            ids[r, used:used + n] = torch.tensor([tokenizer.bos_id, *doc.ids, tokenizer.eos_id], device=ids.device)
            mask[r, used + 1:used + n] = torch.tensor([*doc.mask, 1], dtype=torch.bool, device=mask.device)
            used += n
    return ids, mask


def phase_data(tokenizer: Tokenizer, phase: Phase, seed: int = 0, replay: float = 0.2) -> PackedData:
    """The rows one phase reads, once each: (1 - replay) of steps · batch_size as masked retrieval rows, the rest
    the reasoning families' documents packed as pretraining does (full loss), in PackedData's shuffled order."""
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"long-context replay share must be in [0, 1), got {replay}")
    total = phase.steps * phase.batch_size
    n_replay = round(replay * total)
    rows, mask = retrieval_rows(tokenizer, phase, total - n_replay, seed)
    if n_replay:
        texts = task_texts(n_replay * phase.seq_len // 30 + 8, seed)  # task documents are ~30-120 tokens
        docs = [Document(d) for d in tokenizer.encode_batch(texts)]
        r, m = pack(docs, phase.seq_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        rows, mask = torch.cat([rows, r[:n_replay]]), torch.cat([mask, m[:n_replay]])
    return PackedData(rows, mask, seed)


def phase_config(phase: Phase) -> loop.TrainConfig:
    """The training loop's settings for a phase: a fresh warmup-stable-decay schedule at the phase's peak (10 %
    warmup, the default 20 % decay), no weight decay (a few hundred steps from trained weights)."""
    return loop.TrainConfig(steps=phase.steps, batch_size=phase.batch_size, lr=phase.lr,
                            warmup=max(1, phase.steps // 10), weight_decay=0.0, eval_every=10**6, log_every=10)


def cpt(init_from: str | Path, out: str | Path, phases: tuple[Phase, ...] = PHASES, replay: float = 0.2,
        seed: int = 0, console: Console | None = None) -> Path:
    """Run the long-context CPT phases from the checkpoint `init_from`; phase k writes `out/phaseK/` (metrics.jsonl,
    final/). Returns the last phase's final/ folder."""
    tokenizer = checkpoint.load_tokenizer(init_from, True)
    model = checkpoint.load(init_from, dtype=torch.float32, dequantize=True)
    source = Path(init_from)
    for k, phase in enumerate(phases, 1):
        where = Path(out) / f"phase{k}"
        data = phase_data(tokenizer, phase, seed + k, replay)
        loop.train(model.train(), tokenizer, data, phase_config(phase), where, console=console,
                   stage=f"cpt {k}/{len(phases)}")
        checkpoint.save(model, where / "final", tokenizer)
        source = where / "final"
    return source


def main() -> None:
    """`python -m nemotron3.train.long_context --init-from DIR --out DIR [--phases 1 2 3 4]`: the CPT phases."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--init-from", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", type=int, nargs="+", default=list(range(1, len(PHASES) + 1)),
                    help="which of PHASES to run, in order (1-based)")
    ap.add_argument("--replay", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bad = [k for k in args.phases if not 1 <= k <= len(PHASES)]
    if bad:
        raise SystemExit(f"error: --phases {bad[0]}: there are phases 1..{len(PHASES)}")
    print(cpt(args.init_from, args.out, tuple(PHASES[k - 1] for k in args.phases), args.replay, args.seed))


if __name__ == "__main__":
    main()
