"""Training data: documents from the embedded tasks or the user's files, packed into fixed-length rows.

**Documents.** A document is token ids plus a per-token loss mask. Pretraining documents are plain text
(`Document.mask` all ones). (SFT's chat conversations, masked to the assistant's tokens, are rows of their
own, one conversation per row: train/sft_data.py.) Sources:

- the synthetic reasoning tasks of `nemotron3.tasks` (the embedded default: no download);
- `.txt` files (one document per file; an empty or all-whitespace file is an error naming it), `.jsonl` files
  (one JSON object per line with a string field `text`, nested at most MAX_JSON_DEPTH deep), `.parquet` files
  (a string column `text`, read with pyarrow), or folders of such files.

**Packing.** Every document becomes `<s> ids </s>` and the documents are concatenated into one stream,
cut into rows of T+1 tokens that overlap by one: row i = stream[i·T : i·T + T + 1], inputs row[:-1],
targets row[1:]. Every token of the stream is the target of exactly one row (the tail is padded with
`<unk>` under a zero mask), so packing drops nothing. Document boundaries stay visible to the model as
`</s> <s>`; a target `<s>` is masked out (which document comes next is not predictable). Attention and the
SSM state do run across boundaries, as in Megatron's packed pretraining without resets.

**Order.** Rows are visited in epochs; epoch e is `randperm(N)` from a generator seeded with
`derive_seed(seed, e)` (engine/sampling.py: `seed · 1,000,003 + e`, the one rule of derived seeds), so the batch
at any *position* (rows consumed so far) is a pure function of (data, seed, position). That position is the
whole resume state of the data. Weighted mixtures of several sources, in phases, are train/mixture.py's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemotron3 import tasks
from nemotron3.options import derive_seed
from nemotron3.tokenizer import Tokenizer

SUPPORTED = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


@dataclass
class Document:
    ids: list[int]
    mask: list[int] | None = None  # 1 = train on this token as a target; None = all ones


# ----------------------------------------------------------------------------------------- sources
# Held-out task problems `nemotron3 pretrain` evaluates on (20 per family), drawn from the held-out split.
HELDOUT_TASK_PROBLEMS = 120

def task_texts(n: int, seed: int, split: str = "train", difficulty: int = 1) -> list[str]:
    """`n` task documents (prompt, <think> trace </think>, answer) mixed evenly over every family."""
    return [p.text() for p in tasks.mixture(n, seed=seed, split=split, difficulty=difficulty)]


def _files(paths: list[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUPPORTED and f.is_file())
            if not found:
                raise DataError(f"{p}: folder has no {'/'.join(SUPPORTED)} files")
            out += found
        elif not p.exists():
            raise DataError(f"{p}: no such file or folder")
        elif p.suffix not in SUPPORTED:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; use {', '.join(SUPPORTED)}")
        else:
            out.append(p)
    return out


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line: {e.reason}); re-encode the file "
                        "as UTF-8") from None


# Deepest nesting of arrays and objects a data line may have. Python's json parser recurses once per level and
# raises RecursionError near 1000; whatever walks the value afterwards (json.dumps of tools and tool-call
# arguments in the chat template, the reward functions' columns) recurses too, from a deeper stack. Real
# conversations, tool schemas and arguments are a few levels deep.
MAX_JSON_DEPTH = 100


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (a scalar 0, `[]` 1, `[{}]` 2), walked without recursion; stops
    counting once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_depth(value: Any, where: str) -> Any:
    """`value`, or DataError naming `where` when it nests deeper than MAX_JSON_DEPTH."""
    if json_depth(value) > MAX_JSON_DEPTH:
        raise DataError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def loads(text: str, where: str) -> Any:
    """`json.loads(text)`, with nesting deeper than MAX_JSON_DEPTH a DataError naming `where` instead of a
    RecursionError (or a value that breaks whatever walks it next). json.JSONDecodeError passes through, for the
    caller to word."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # cheap: only such a text can nest that deep
        check_depth(value, where)
    return value


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed value) for every non-blank line of a .jsonl file, in order; DataError naming
    file:line for a line that is not UTF-8, not JSON, or nested deeper than MAX_JSON_DEPTH. The pretraining
    texts, SFT conversations and RL prompts all read their .jsonl files through it."""
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            line = _utf8(raw, where)
            if not line.strip():
                continue
            try:
                value = loads(line, where)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield where, value


def read_texts(paths: list[str | Path]) -> list[str]:
    """All documents of the given files and folders, in sorted file order."""
    texts: list[str] = []
    for f in _files(paths):
        if f.suffix == ".txt":
            text = _utf8(f.read_bytes(), str(f))
            if not text.strip():  # one document per file: an empty one is a mistake, not a document
                raise DataError(f"{f}: empty file (no text to train on)")
            texts.append(text)
        elif f.suffix == ".jsonl":
            for where, obj in jsonl_records(f):
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{where}: expected an object with a string field 'text'")
                texts.append(obj["text"])
        else:
            import pyarrow as pa  # only parquet needs pyarrow
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f}: not a readable parquet file ({e})") from None
            if "text" not in table.column_names:
                raise DataError(f"{f}: parquet file has no 'text' column (columns: {table.column_names})")
            for i, t in enumerate(table.column("text").to_pylist()):
                if not isinstance(t, str):
                    raise DataError(f"{f}: row {i} of column 'text' is {type(t).__name__}, not a string")
                texts.append(t)
    if not texts:
        raise DataError(f"no documents in {', '.join(map(str, paths))}")
    return texts


# ----------------------------------------------------------------------------------------- packing
def pack(docs: list[Document], seq_len: int, bos_id: int, eos_id: int,
         pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents -> rows (N, T+1) int64 and target mask (N, T+1) bool (column 0 is never a target)."""
    ids: list[int] = []
    mask: list[int] = []
    for d in docs:
        m = d.mask if d.mask is not None else [1] * len(d.ids)
        if len(m) != len(d.ids):
            raise ValueError(f"document mask has {len(m)} entries for {len(d.ids)} tokens")
        ids += [bos_id, *d.ids, eos_id]
        mask += [0, *m, 1]  # <s> is not predictable; </s> is (the document ends here)
    n_rows = max(1, math.ceil((len(ids) - 1) / seq_len))
    total = n_rows * seq_len + 1
    ids += [pad_id] * (total - len(ids))
    mask += [0] * (total - len(mask))
    stream = torch.tensor(ids, dtype=torch.long)
    mstream = torch.tensor(mask, dtype=torch.bool)
    starts = torch.arange(n_rows) * seq_len
    index = starts[:, None] + torch.arange(seq_len + 1)  # (N, T+1)
    return stream[index], mstream[index]


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) bool: which targets count

    def split(self, n: int) -> list[Batch]:
        """Into micro-batches of at most n rows."""
        return [Batch(i, t, m) for i, t, m in zip(self.inputs.split(n), self.targets.split(n), self.mask.split(n))]


class PackedData:
    """Packed rows and their seeded epoch order; `batch(position, size)` is deterministic."""

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> None:
        self.rows, self.mask, self.seed = rows, mask, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1] - 1

    def fingerprint(self) -> str:
        """A hash of the rows, mask and seed: resuming on different data is an error, not a silent change."""
        h = hashlib.blake2b(digest_size=12)
        h.update(self.rows.numpy().tobytes())
        h.update(self.mask.numpy().tobytes())
        h.update(str(self.seed).encode())
        return h.hexdigest()

    def order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self), generator=g))
        return self._perm[1]

    def indices(self, position: int, size: int) -> list[int]:
        """Row indices of the `size` rows starting at global `position` (may span an epoch boundary)."""
        n = len(self)
        return [int(self.order(p // n)[p % n]) for p in range(position, position + size)]

    def take(self, index: list[int]) -> Batch:
        rows, mask = self.rows[index], self.mask[index]
        return Batch(rows[:, :-1], rows[:, 1:], mask[:, 1:])

    def batch(self, position: int, size: int) -> Batch:
        return self.take(self.indices(position, size))


def build(tokenizer: Tokenizer, texts: list[str], seq_len: int, seed: int) -> PackedData:
    """Tokenize and pack plain-text documents."""
    docs = [Document(ids) for ids in tokenizer.encode_batch(texts)]
    rows, mask = pack(docs, seq_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    return PackedData(rows, mask, seed)


def tail_rows(n: int, fraction: float, what: str = "") -> int:
    """How many of `n` packed rows a held-out tail of `fraction` takes: at least one, and never all (DataError,
    naming `what` when given)."""
    k = max(1, round(n * fraction))
    if n - k < 1:
        raise DataError(f"{what + ': ' if what else ''}only {n} packed rows: too little data to hold any out for "
                        "evaluation")
    return k


def split_tail(data: PackedData, fraction: float) -> tuple[PackedData, PackedData]:
    """Hold out the last `fraction` of rows (at least one): for user text, whose held-out part is a contiguous
    tail of the stream that training never sees."""
    n = len(data)
    k = tail_rows(n, fraction)
    return (PackedData(data.rows[:-k], data.mask[:-k], data.seed),
            PackedData(data.rows[-k:], data.mask[-k:], data.seed))
