"""Training data beyond the happy path: what folders contribute, the whole text of every data error, the task
documents' defaults, `build` by hand, and the epoch order and fingerprint against their documented definitions.

References: hand-written file trees and messages (byte offsets and decoder reasons worked out by hand);
`tasks.mixture` for which task problems a call means (data.py only renders them); a hand-packed stream for
`build`; `torch.randperm` with the documented generator seed `seed * 1_000_003 + epoch`; `hashlib.blake2b`
(12-byte digest) over the rows, mask and seed for the fingerprint.
"""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from nemotron3 import tasks
from nemotron3.train import data as train_data

DataError = train_data.DataError


def _message(paths) -> str:
    with pytest.raises(DataError) as e:
        train_data.read_texts(paths)
    return str(e.value)


def test_task_texts_are_the_mixture_documents_with_the_documented_defaults():
    n = 12
    want = [p.text() for p in tasks.mixture(n, seed=5, split="train", difficulty=1)]
    assert train_data.task_texts(n, seed=5) == want  # split "train", difficulty 1 by default
    held = train_data.task_texts(n, 5, "heldout", 2)
    assert held == [p.text() for p in tasks.mixture(n, seed=5, split="heldout", difficulty=2)]
    assert train_data.task_texts(n, seed=6) != want
    for text in held:
        prompt = text.split("\n<think>\n")[0]
        fam, params = tasks.family_of(prompt)
        assert tasks.split_of(fam.key(params)) == "heldout"


def test_folders_give_their_supported_files_recursively_and_every_folder_counts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    (a / "1.txt").write_text("one")
    (a / "sub" / "2.jsonl").write_text('{"text": "two"}\n')
    (a / "README.md").write_text("not data")  # an unsupported file in a folder is skipped, not an error
    (a / "notes.txt").mkdir()  # a folder with a data suffix is not a file
    (b / "3.txt").write_text("three")
    assert train_data.read_texts([a, b]) == ["one", "two", "three"]
    assert train_data.read_texts([b / "3.txt", a]) == ["three", "one", "two"]


def test_every_data_error_message_in_full(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    assert _message([empty]) == f"{empty}: folder has no .txt/.jsonl/.parquet files"
    assert _message([tmp_path / "gone.txt"]) == f"{tmp_path / 'gone.txt'}: no such file or folder"
    (tmp_path / "x.csv").write_text("a,b")
    assert _message([tmp_path / "x.csv"]) == (f"{tmp_path / 'x.csv'}: unsupported file type '.csv'; "
                                              "use .txt, .jsonl, .parquet")

    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\xffno")  # 0xff can start no UTF-8 sequence: byte 2
    assert _message([latin]) == (f"{latin}: not UTF-8 text (byte 2 of the line: invalid start byte); "
                                 "re-encode the file as UTF-8")
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n')  # 0xe9 followed by '"': byte 10 of line 2
    assert _message([lines]) == (f"{lines}:2: not UTF-8 text (byte 10 of the line: invalid continuation byte); "
                                 "re-encode the file as UTF-8")
    lines.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    assert _message([lines]) == f"{lines}:3: malformed JSON (Expecting value at column 10)"
    for line in ('["text"]', '{"text": 3}'):
        lines.write_text(line + "\n")
        assert _message([lines]) == f"{lines}:1: expected an object with a string field 'text'"

    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    assert re.match(rf"^{re.escape(str(junk))}: not a readable parquet file \(.+\)$", _message([junk]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    assert _message([tmp_path / "d.parquet"]) == (f"{tmp_path / 'd.parquet'}: parquet file has no 'text' column "
                                                  "(columns: ['body'])")
    pq.write_table(pa.table({"text": [7, 8]}), tmp_path / "n.parquet")
    assert _message([tmp_path / "n.parquet"]) == (f"{tmp_path / 'n.parquet'}: row 0 of column 'text' is int, "
                                                  "not a string")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "z.parquet")
    assert _message([tmp_path / "z.parquet"]) == (f"{tmp_path / 'z.parquet'}: row 1 of column 'text' is NoneType, "
                                                  "not a string")

    blank1, blank2 = tmp_path / "blank1.jsonl", tmp_path / "blank2.jsonl"
    blank1.write_text("")
    blank2.write_text("\n   \n")
    assert _message([blank1, blank2]) == f"no documents in {blank1}, {blank2}"

    with pytest.raises(ValueError) as e:
        train_data.pack([train_data.Document([5, 6, 7], [1, 0])], 4, 1, 2, 0)
    assert str(e.value) == "document mask has 2 entries for 3 tokens"


class _CharTok:
    """Each character is one token, its code point; <s>=1, </s>=2, padding 3."""

    bos_id, eos_id, pad_id = 1, 2, 3

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def test_build_tokenizes_packs_and_keeps_the_seed():
    data = train_data.build(_CharTok(), ["ab", "cd"], seq_len=3, seed=9)
    # stream <s> a b </s> <s> c d </s> = 1 97 98 2 1 99 100 2: seven targets, three rows of three overlapping by
    # one, the last two places padded (3) and masked
    assert data.rows.tolist() == [[1, 97, 98, 2], [2, 1, 99, 100], [100, 2, 3, 3]]
    assert data.mask.int().tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0]]
    assert data.seed == 9 and data.seq_len == 3 and len(data) == 3


def test_the_epoch_order_is_randperm_under_the_documented_seed():
    rows = torch.arange(11)[:, None].repeat(1, 4)
    mask = torch.ones_like(rows, dtype=torch.bool)
    for seed in (0, 3):
        data = train_data.PackedData(rows, mask, seed=seed)
        for epoch in (0, 1, 2):
            want = torch.randperm(11, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
            assert data.order(epoch).tolist() == want
            assert data.indices(11 * epoch, 11) == want
    default = train_data.PackedData(rows, mask)
    assert default.seed == 0 and default.indices(0, 22) == train_data.PackedData(rows, mask, seed=0).indices(0, 22)
    assert default.indices(0, 11) != train_data.PackedData(rows, mask, seed=1).indices(0, 11)


def test_the_fingerprint_is_blake2b_of_rows_mask_and_seed():
    rows = torch.tensor([[1, 5, 6], [6, 2, 0]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    for seed in (0, 7):
        h = hashlib.blake2b(digest_size=12)
        for part in (rows.numpy().tobytes(), mask.numpy().tobytes(), str(seed).encode()):
            h.update(part)
        got = train_data.PackedData(rows, mask, seed).fingerprint()
        assert got == h.hexdigest() and len(got) == 24


def test_micro_batches_are_consecutive_row_slices():
    rows = torch.arange(5 * 4).reshape(5, 4)
    mask = rows % 3 != 0
    data = train_data.PackedData(rows, mask)
    whole = data.take([4, 0, 2, 1, 3])
    parts = whole.split(2)
    assert [p.inputs.shape[0] for p in parts] == [2, 2, 1]
    order = [4, 0, 2, 1, 3]
    for k, p in enumerate(parts):
        idx = order[2 * k: 2 * k + 2]
        assert p.inputs.tolist() == [rows[i, :-1].tolist() for i in idx]
        assert p.targets.tolist() == [rows[i, 1:].tolist() for i in idx]
        assert p.mask.tolist() == [mask[i, 1:].tolist() for i in idx]


def test_two_rows_split_into_one_for_training_and_one_held_out():
    rows = torch.tensor([[1, 5, 6], [6, 2, 0]])
    data = train_data.PackedData(rows, rows > 0, seed=4)
    train, held = train_data.split_tail(data, 0.1)  # 0.2 rounds to 0 rows: at least one is held out
    assert train.rows.tolist() == [[1, 5, 6]] and held.rows.tolist() == [[6, 2, 0]]
    assert held.mask.tolist() == [[True, True, False]] and train.seed == held.seed == 4
