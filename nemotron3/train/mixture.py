"""Weighted mixtures of pretraining sources, in phases: Nemotron 3's blend (phase 1, then a phase-2 blend of
higher-quality sources for the last part of the run), on the rows of train/data.py.

**Sources.** `--data` and `--phase2-data` take `PATH[:WEIGHT]` items: a file or folder as train/data.py reads them,
or `tasks`, the embedded task families. A weight is a non-negative number after the last `:` (a path that exists
as written, colon and all, is a path); the weights of a phase are normalised to sum to 1, and are shares of the
phase's *counted target tokens* (those the loss trains on, the `tokens` of a step's metrics record). Without
weights (and without a phase 2) the sources are pooled as before: every row of the pool once per epoch, the task
text sized to half the run's tokens next to user text.

**Interleaving.** Each source (a *component*: one source, or the pool) is packed on its own. Within a phase, the
next row comes from the component with the largest token deficit `w_c · T − t_c` (T the phase's counted tokens so
far, t_c component c's, w_c its weight; ties to the earlier source). The deficits sum to 0 and none exceeds
(S − 1) rows' tokens, so over any prefix of a phase the realised share of a source is within (S − 1) · seq_len / T
of its weight: ±0.05 % over 2,000 rows of two sources, where i.i.d. draws would wander by ±1 % (one standard
error at w = 0.3). A component visits its rows in epochs, epoch e of component j in the order
`randperm(n_j)` seeded with `derive_seed(seed, j · 2^32 + e)` (component 0 of a single pool is PackedData's own
order, bit for bit); a component that runs out of rows starts its next epoch (its rows repeat: `repeats` says how
often, and the stage warns). A source of both phases is one component: phase 2 continues its order.

**Phases and resume.** Phase 2 starts at position S · batch_size, S = the switch step (PretrainConfig.phase2_step).
The row at every position is a pure function of (rows, weights, phases, seed, position): the schedule is replayed
from position 0 whenever it is asked for a position it has not reached (O(rows) once per process), so a resumed
run sees exactly the rows of the uninterrupted one, across the switch too. The loop asks `batch(position, size)`
as of any PackedData.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemotron3.options import derive_seed
from nemotron3.tokenizer import Tokenizer
from nemotron3.train.data import Document, PackedData, pack, tail_rows

TASKS = "tasks"  # the source name of the embedded task families
EPOCH_STREAMS = 2**32  # component j's epoch e draws from seed stream j · 2^32 + e


class SpecError(ValueError):
    """A mixture flag's item (`item`; None: the flag's whole value) that cannot be; `field` names the config field
    (`data`, `phase2_data`, `tasks`, `phase2_at`) for the caller's message."""

    def __init__(self, item: str | None, message: str, field: str = "data") -> None:
        super().__init__(message)
        self.item, self.field = item, field


@dataclass(frozen=True)
class Source:
    name: str  # `tasks`, or the path as given
    weight: float | None = None  # None: no weight given


def parse_source(spec: str | Path) -> Source:
    """`PATH[:WEIGHT]` -> Source; SpecError for a weight that is not a finite non-negative number."""
    text = str(spec)
    head, colon, tail = text.rpartition(":")
    if not colon or not head or "/" in tail or "\\" in tail or Path(text).exists():
        return Source(text)
    try:
        weight = float(tail)
    except ValueError:
        raise SpecError(text, f"the weight {tail!r} is not a number (PATH:WEIGHT, e.g. {head}:0.5)") from None
    if not math.isfinite(weight):
        raise SpecError(text, f"the weight {tail!r} is not a finite number")
    if weight < 0:
        raise SpecError(text, f"the weight {tail} is negative")
    return Source(head, weight)


def parse_phase(specs: list[str | Path]) -> list[Source]:
    """The sources of one phase: each item parsed, no source twice, every source weighted or none, weights with
    a positive sum."""
    sources: list[Source] = []
    for spec in specs:
        s = parse_source(spec)
        if any(o.name == s.name for o in sources):
            raise SpecError(str(spec), f"names {s.name} a second time")
        sources.append(s)
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) < len(sources):
        bare = next(str(p) for p, s in zip(specs, sources) if s.weight is None)
        raise SpecError(bare, "has no weight while other sources have one: give every source a weight "
                        "(PATH:WEIGHT), or none")
    if weighted and sum(s.weight for s in weighted) <= 0:
        raise SpecError(None, "the weights sum to 0: give at least one source a positive weight")
    return sources


def blend(data: list[str | Path], tasks: bool | None, phase2_data: list[str | Path], phase2_at: float | None,
          phase2_step: int, steps: int) -> list[list[Source]]:
    """The sources of each phase: phase 1 from `data`, with the task families where `tasks` (--tasks) or the
    default (no `data`) says; phase 2 from `phase2_data`, from step `phase2_step` of `steps`. SpecError naming the
    field and item at fault."""
    phases = []
    for name, specs in (("data", data), ("phase2_data", phase2_data)):
        try:
            phases.append(parse_phase(specs))
        except SpecError as e:
            raise SpecError(e.item, str(e), name) from None
    first, second = phases
    names = [s.name for s in first]
    weighted = any(s.weight is not None for s in first)
    if tasks is not None and weighted:
        raise SpecError(None, "with weights in --data, name the task families there as a source: tasks:WEIGHT",
                        "tasks")
    if tasks is False and TASKS in names:
        raise SpecError(None, "--data names tasks as a source", "tasks")
    if not weighted and TASKS not in names and (tasks or (tasks is None and not first)):
        first.append(Source(TASKS))
    if not first:
        raise SpecError(None, "no training data: give --data files or keep the embedded tasks", "tasks")
    if phase2_at is None:
        if second:
            raise SpecError(None, "needs --phase2-at FRACTION, the fraction of the steps after which this blend "
                            "starts", "phase2_data")
        return [first]
    if not 0 < phase2_at < 1:
        raise SpecError(None, "must be a fraction strictly between 0 and 1", "phase2_at")
    if not second:
        raise SpecError(None, "switches to the --phase2-data blend: give --phase2-data PATH:WEIGHT ...", "phase2_at")
    if not 0 < phase2_step < steps:
        raise SpecError(None, f"switches at step {phase2_step} of --steps {steps}, which leaves a phase without a "
                        "step", "phase2_at")
    for name, sources in (("data", first), ("phase2_data", second)):
        if len(sources) > 1 and sources[0].weight is None:
            raise SpecError(None, "with --phase2-at, give every source of a phase a weight (PATH:WEIGHT; the task "
                            "families: tasks:WEIGHT)", name)
    return [first, second]


def task_share(sources: list[Source]) -> float:
    """The task families' share of a phase's tokens: their weight, or without weights all of a lone source and
    half of a pool with user text (as before mixtures); 0 when they are not a source."""
    names = [s.name for s in sources]
    if TASKS not in names:
        return 0.0
    if sources[0].weight is not None:
        return weights(sources)[names.index(TASKS)]
    return 0.5 if len(sources) > 1 else 1.0


def weights(sources: list[Source]) -> list[float]:
    """The normalised weights of a phase's sources (a lone unweighted source: 1)."""
    given = [s.weight if s.weight is not None else 1.0 for s in sources]
    return [w / sum(given) for w in given]


# ----------------------------------------------------------------------------------------- labelled packing
def pack_labelled(docs: list[list[int]], labels: list[int], n_labels: int, seq_len: int, bos_id: int, eos_id: int,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack` of plain-text documents, plus (N, n_labels) int64: each row's counted target tokens from each
    document's label (a row that straddles two sources counts each one's tokens). Row i's targets are stream
    positions i·T + 1 … i·T + T of pack's stream, where document d spans len(d) + 2 positions (`<s> ids </s>`).
    On the host, as pack's rows (the loop moves batches)."""
    rows, mask = pack([Document(d) for d in docs], seq_len, bos_id, eos_id, pad_id)
    n, stream_len = rows.shape[0], rows.shape[0] * seq_len + 1
    lab = torch.repeat_interleave(torch.tensor(labels, dtype=torch.long, device="cpu"),
                                  torch.tensor([len(d) + 2 for d in docs], dtype=torch.long, device="cpu"))
    lab = torch.cat([lab, torch.full((stream_len - lab.numel(),), -1, dtype=torch.long, device="cpu")])
    targets = lab[1:].view(n, seq_len)
    counted = mask[:, 1:]
    tokens = torch.stack([((targets == k) & counted).sum(1) for k in range(n_labels)], dim=1)
    return rows, mask, tokens


# ----------------------------------------------------------------------------------------- the mixture
@dataclass
class Phase:
    name: str  # "phase1", "phase2"
    start: int  # first position (rows consumed) of the phase
    sources: list[str]  # every source of the phase, weight 0 included (its share is reported)
    parts: list[tuple[int, float]] = field(default_factory=list)  # (component, weight > 0)
    weights: dict[str, float] = field(default_factory=dict)  # each source's weight ({}: a pool, no weights)


class MixedData(PackedData):
    """The rows of every component, concatenated (`rows`, `mask`: what `unigram_baseline` and `take` read), and the
    phases' interleaving of them (`indices`); `label_tokens[i, k]` counts row i's target tokens of source k."""

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor, label_tokens: torch.Tensor, names: list[str],
                 spans: list[tuple[int, int]], phases: list[Phase], seed: int = 0) -> None:
        super().__init__(rows, mask, seed)
        self.label_tokens, self.names, self.spans, self.phases = label_tokens, names, spans, phases
        self._row_tokens: list[int] = label_tokens.sum(1).tolist()
        self._schedule: list[int] = []  # the global row of every position computed so far
        self._draws = [0] * len(spans)  # rows drawn from each component so far
        self._tally: list[list[int]] = [[0] * len(p.parts) for p in phases]  # tokens per part, per phase
        self._perms: dict[int, tuple[int, list[int]]] = {}
        self.single = len(phases) == 1 and len(phases[0].parts) == 1 and spans == [(0, len(self))]

    def fingerprint(self) -> str:
        """PackedData's hash for a single pool (a run of before mixtures resumes as it was); else also the
        components, weights and phase starts."""
        if self.single:
            return super().fingerprint()
        h = hashlib.blake2b(digest_size=12)
        h.update(super().fingerprint().encode())
        h.update(json.dumps([self.names, self.spans, [(p.start, p.sources, p.parts) for p in self.phases]]).encode())
        return h.hexdigest()

    def _row(self, component: int) -> int:
        """The next row of `component` in its epoch order."""
        lo, hi = self.spans[component]
        epoch, r = divmod(self._draws[component], hi - lo)
        cached = self._perms.get(component)
        if cached is None or cached[0] != epoch:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, component * EPOCH_STREAMS + epoch))
            cached = (epoch, torch.randperm(hi - lo, generator=g, device="cpu").tolist())
            self._perms[component] = cached
        self._draws[component] += 1
        return lo + cached[1][r]

    def _extend(self, end: int) -> None:
        k = 0
        while len(self._schedule) < end:
            p = len(self._schedule)
            while k + 1 < len(self.phases) and p >= self.phases[k + 1].start:
                k += 1
            parts, tally = self.phases[k].parts, self._tally[k]
            total = sum(tally)
            best, deficit = 0, -math.inf
            for i, (_, w) in enumerate(parts):  # the largest deficit; ties to the earlier part
                if w * total - tally[i] > deficit:
                    best, deficit = i, w * total - tally[i]
            row = self._row(parts[best][0])
            tally[best] += self._row_tokens[row]
            self._schedule.append(row)

    def indices(self, position: int, size: int) -> list[int]:
        if self.single:
            return super().indices(position, size)
        self._extend(position + size)
        return self._schedule[position:position + size]

    def _ends(self, end: int) -> list[tuple[Phase, int, int]]:
        starts = [p.start for p in self.phases] + [max(end, self.phases[-1].start)]
        return [(p, p.start, min(end, stop)) for p, stop in zip(self.phases, starts[1:])]

    def shares(self, end: int) -> dict[str, dict[str, float]]:
        """Each phase's realised share of counted target tokens per source over positions [start, `end`) of the
        phase ({} for a phase `end` does not reach)."""
        out: dict[str, dict[str, float]] = {}
        for phase, lo, hi in self._ends(end):
            if hi <= lo:
                out[phase.name] = {}
                continue
            counts = self.label_tokens[self.indices(lo, hi - lo)].sum(0).double()
            total = max(1.0, float(counts.sum()))
            out[phase.name] = {s: round(float(counts[self.names.index(s)]) / total, 6) for s in phase.sources}
        return out

    def plan(self, steps: list[int]) -> list[str]:
        """A line per phase (`steps[k]` steps each): its sources with their weights."""
        lines, first = [], 1
        for phase, n in zip(self.phases, steps):
            blend = ", ".join(f"{s} {phase.weights[s]:.0%}" if phase.weights else s for s in phase.sources)
            lines.append(f"{phase.name} (steps {first}-{first + n - 1}): {blend}")
            first += n
        return lines

    def repeats(self, end: int) -> dict[int, float]:
        """{component: epochs} for the components whose rows positions [0, `end`) draw more than once."""
        starts = torch.tensor([lo for lo, _ in self.spans], device="cpu")
        component = torch.searchsorted(starts, torch.tensor(self.indices(0, end), device="cpu"), right=True) - 1
        draws = torch.bincount(component, minlength=len(self.spans)).tolist()
        return {j: d / (hi - lo) for j, (d, (lo, hi)) in enumerate(zip(draws, self.spans)) if d > hi - lo}


# ----------------------------------------------------------------------------------------- assembly
def assemble(tokenizer: Tokenizer, phases: list[list[Source]], starts: list[int], texts: dict[str, list[str]],
             task_heldout: list[str], seq_len: int, seed: int,
             heldout_fraction: float) -> tuple[MixedData, PackedData]:
    """The training mixture and the held-out rows of a run whose phase k has `phases[k]` and starts at position
    `starts[k]`; `texts[name]` are each source's documents (the task families' under TASKS).

    Components: one pool of every source for a lone phase without weights (its user text packed as one stream
    and its held-out part that stream's tail, then the task rows: the rows and order of before mixtures), else one
    per source (a user source's held-out part is its own tail). Held-out task rows are `task_heldout`."""
    names = list(dict.fromkeys(s.name for phase in phases for s in phase))
    label = {n: i for i, n in enumerate(names)}
    pooled = len(phases) == 1 and len(phases[0]) > 1 and phases[0][0].weight is None
    groups = [names] if pooled else [[n] for n in names]
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    spans: list[tuple[int, int]] = []
    lo = 0
    for group in groups:
        user = [n for n in group if n != TASKS]
        size = 0
        if user:
            docs = tokenizer.encode_batch([t for n in user for t in texts[n]])
            labels = [label[n] for n in user for _ in texts[n]]
            rows, mask, tokens = pack_labelled(docs, labels, len(names), seq_len, *ids)
            k = tail_rows(rows.shape[0], heldout_fraction, ", ".join(user))
            parts.append((rows[:-k], mask[:-k], tokens[:-k]))
            held.append((rows[-k:], mask[-k:]))
            size += rows.shape[0] - k
        if TASKS in group:
            docs = tokenizer.encode_batch(texts[TASKS])
            rows, mask, tokens = pack_labelled(docs, [label[TASKS]] * len(docs), len(names), seq_len, *ids)
            parts.append((rows, mask, tokens))
            held.append(pack([Document(d) for d in tokenizer.encode_batch(task_heldout)], seq_len, *ids))
            size += rows.shape[0]
        spans.append((lo, lo + size))
        lo += size
    component = {n: j for j, group in enumerate(groups) for n in group}
    mixed = []
    for k, (phase, start) in enumerate(zip(phases, starts)):
        p = Phase(f"phase{k + 1}", start, [s.name for s in phase])
        if pooled:
            p.parts = [(0, 1.0)]
        else:
            p.parts = [(component[s.name], w) for s, w in zip(phase, weights(phase)) if w > 0]
            p.weights = {s.name: w for s, w in zip(phase, weights(phase))} if len(phase) > 1 else {}
        mixed.append(p)
    data = MixedData(*(torch.cat([x[i] for x in parts]) for i in range(3)), names, spans, mixed, seed)
    heldout = PackedData(torch.cat([r for r, _ in held]), torch.cat([m for _, m in held]), seed)
    return data, heldout


def log_shares(metrics: Path, shares: dict[str, dict[str, float]], ends: list[int], done: int) -> None:
    """Append `{"step", "phase", "data_shares"}` to metrics.jsonl for each phase a run of `done` steps completed
    (`ends[k]`: phase k's last step), once (a resumed run that completes it again writes no second line)."""
    have = metrics.read_text().splitlines() if metrics.exists() else []
    with metrics.open("a") as f:
        for (phase, share), end in zip(shares.items(), ends):
            line = json.dumps({"step": end, "phase": phase, "data_shares": share})
            if done >= end and line not in have:
                f.write(line + "\n")
