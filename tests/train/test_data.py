"""Tokenizer, document sources and packing."""

from __future__ import annotations

import json
import random

import pytest
import torch

from nemotron3.tokenizer import SPECIAL_TOKENS, Tokenizer
from nemotron3.train import data as train_data


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(600, seed=0), vocab_size=600)


def test_tokenizer_roundtrips_any_text_and_splits_digits(tok):
    for text in ["What is 347 + 285?", "héllo wörld ✓ 🙂\n\ttabs", "<think>\n1+2=3\n</think>\n3", ""]:
        assert tok.decode(tok.encode(text)) == text
    digits = [tok.decode([i]) for i in tok.encode("12345")]
    assert digits == list("12345")  # one token per digit, whatever the corpus


def test_special_tokens_have_fixed_ids_and_encode_as_one_token(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for t in SPECIAL_TOKENS[3:]:
        ids = tok.encode(f"a{t}b")
        assert ids.count(tok.token_to_id(t)) == 1 and tok.decode(ids) == f"a{t}b"
    ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\ny<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.end_of_turn_id


def test_tokenizer_training_is_deterministic_and_saves_losslessly(tok, tmp_path):
    again = Tokenizer.train(train_data.task_texts(600, seed=0), vocab_size=600)
    assert again.tk.to_str() == tok.tk.to_str()
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    text = train_data.task_texts(5, seed=3)[4]
    assert loaded.encode(text) == tok.encode(text)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")


def test_tokenizer_loads_in_transformers(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "What is 12 + 30?\n<think>\nok\n</think>\n42"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id


def _naive_pack(docs, T, bos, eos, pad):
    """Build the stream token by token and cut rows with overlap 1: the definition of `pack`."""
    stream, mask = [], []
    for d in docs:
        m = d.mask or [1] * len(d.ids)
        stream.append(bos)
        mask.append(0)
        for t, k in zip(d.ids, m):
            stream.append(t)
            mask.append(k)
        stream.append(eos)
        mask.append(1)
    rows, masks, i = [], [], 0
    while i + 1 < len(stream) or not rows:
        r = stream[i: i + T + 1]
        mr = mask[i: i + T + 1]
        rows.append(r + [pad] * (T + 1 - len(r)))
        masks.append(mr + [0] * (T + 1 - len(mr)))
        i += T
    return rows, masks


def test_packing_preserves_every_token_and_matches_the_naive_definition():
    rng = random.Random(0)
    docs = []
    for _ in range(50):  # half of them with a random SFT-style mask, half unmasked
        ids = [rng.randint(10, 99) for _ in range(rng.randint(1, 40))]
        docs.append(train_data.Document(ids, [rng.randint(0, 1) for _ in ids] if rng.random() < 0.5 else None))
    assert sum(d.mask is not None and 0 in d.mask for d in docs) >= 10
    docs[3] = train_data.Document([5, 6, 7], [0, 1, 0])  # an SFT-style mask
    for T in (7, 16, 64, 1000):
        rows, mask = train_data.pack(docs, T, bos_id=1, eos_id=2, pad_id=0)
        ref_rows, ref_mask = _naive_pack(docs, T, 1, 2, 0)
        assert rows.tolist() == ref_rows and mask.tolist() == ref_mask
        # every target of the stream appears exactly once, in order
        targets = rows[:, 1:].reshape(-1)
        n = sum(len(d.ids) + 2 for d in docs)
        expected = [t for d in docs for t in (1, *d.ids, 2)]
        assert targets[: n - 1].tolist() == expected[1:]
        assert rows[0, 0] == 1 and (rows[:, 1:].reshape(-1)[n - 1:] == 0).all()
        assert not mask[:, 1:].reshape(-1)[n - 1:].any()  # padding never trains
        assert mask[:, 1:][rows[:, 1:] == 1].sum() == 0  # a target <s> is never trained


def test_packed_order_is_a_seeded_permutation_per_epoch():
    rows = torch.arange(10)[:, None].repeat(1, 5)
    data = train_data.PackedData(rows, torch.ones_like(rows, dtype=torch.bool), seed=3)
    first = data.indices(0, 10)
    assert sorted(first) == list(range(10))  # each row once per epoch
    assert sorted(data.indices(10, 10)) == list(range(10)) and data.indices(10, 10) != first
    assert data.indices(7, 6) == first[7:] + data.indices(10, 3)  # a batch may span epochs
    fresh = train_data.PackedData(rows, torch.ones_like(rows, dtype=torch.bool), seed=3)
    assert fresh.indices(13, 4) == data.indices(13, 4)  # a pure function of the position
    other = train_data.PackedData(rows, torch.ones_like(rows, dtype=torch.bool), seed=4)
    assert other.indices(0, 10) != first and other.fingerprint() != data.fingerprint()
    b = data.batch(0, 3)
    assert b.inputs.shape == (3, 4) and torch.equal(b.targets[:, :-1], b.inputs[:, 1:])


def test_read_texts_from_txt_jsonl_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document\nline two")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert train_data.read_texts([tmp_path]) == ["first document\nline two", "one", "two", "p1", "p2"]
    assert train_data.read_texts([tmp_path / "b.jsonl", tmp_path / "a.txt"]) == [
        "one", "two", "first document\nline two"]


def test_bad_data_paths_and_lines_name_the_file_and_line(tmp_path):
    with pytest.raises(train_data.DataError, match=r"nothere\.txt: no such file"):
        train_data.read_texts([tmp_path / "nothere.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(train_data.DataError, match=r"bad\.jsonl:3: malformed JSON"):
        train_data.read_texts([bad])
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(train_data.DataError, match=r"bad\.jsonl:2: expected an object with a string field 'text'"):
        train_data.read_texts([bad])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(train_data.DataError, match=r"x\.csv: unsupported file type"):
        train_data.read_texts([tmp_path / "x.csv"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(train_data.DataError, match=r"d\.parquet: parquet file has no 'text' column"):
        train_data.read_texts([tmp_path / "d.parquet"])


def test_split_tail_holds_out_a_contiguous_tail():
    rows = torch.arange(100)[:, None].repeat(1, 3)
    data = train_data.PackedData(rows, torch.ones_like(rows, dtype=torch.bool))
    train, held = train_data.split_tail(data, 0.05)
    assert len(train) == 95 and held.rows[:, 0].tolist() == list(range(95, 100))
