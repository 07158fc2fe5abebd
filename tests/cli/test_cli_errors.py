"""Every command on broken checkpoints, configs, data files and flag values: a non-zero exit, one short message
that names the culprit, and no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.cli import main
from nemotron3.tokenizer import Tokenizer


def fails(capsys, *argv: str) -> str:
    """Run `nemotron3 ARGV` in-process; assert a clean failure and return what it printed to stderr."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{argv} succeeded"
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err  # argparse: usage line(s) + the error
    return err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny checkpoint folder with a tokenizer, with and without an MTP block."""
    root = tmp_path_factory.mktemp("ckpts")
    tok = Tokenizer.train(["once upon a time there was a tiny model"] * 50, vocab_size=300)
    out = {}
    for name, mtp in (("plain", 0), ("mtp", 1)):
        config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=320, num_nextn_predict_layers=mtp)
        torch.manual_seed(0)
        model = nemotron3.HybridLM(config)
        randomize_(model)
        nemotron3.save_pretrained(model, root / name)
        tok.save(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of a checkpoint to damage: broken("plain") -> folder."""
    def copy(name: str = "plain"):
        dst = tmp_path / f"{name}-copy"
        shutil.copytree(checkpoints[name], dst)
        return dst
    return copy


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# ------------------------------------------------------------------ generate: broken checkpoints
def test_config_json_that_is_not_json(broken, capsys):
    folder = broken()
    (folder / "config.json").write_text("{not json")
    assert "config.json" in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")


@pytest.mark.parametrize("field,value", [("hidden_size", "big"), ("eos_token_id", "abc"),
                                         ("use_conv_bias", "abc"), ("num_attention_heads", -4),
                                         ("hiden_size", 64)])
def test_config_field_of_the_wrong_type_or_unknown(broken, capsys, field, value):
    folder = broken()
    _edit_config(folder, **{field: value})
    assert field in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")


@pytest.mark.parametrize("name", ["plain", "mtp"])
def test_truncated_weights(broken, capsys, name):
    folder = broken(name)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors" in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")


def test_garbage_weights_file(broken, capsys):
    folder = broken()
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    assert "model.safetensors" in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")


def test_missing_weights(broken, capsys):
    folder = broken()
    (folder / "model.safetensors").unlink()
    assert "safetensors" in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")


def test_missing_and_misshaped_tensors(broken, capsys):
    from safetensors.torch import load_file, save_file

    folder = broken()
    tensors = load_file(folder / "model.safetensors")
    del tensors["backbone.norm_f.weight"]
    save_file(tensors, folder / "model.safetensors")
    assert "backbone.norm_f.weight" in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")
    tensors["backbone.norm_f.weight"] = torch.ones(7)
    save_file(tensors, folder / "model.safetensors")
    err = fails(capsys, "generate", "--model", str(folder), "--ids", "1,2")
    assert "backbone.norm_f.weight" in err and "[7]" in err


def test_corrupt_tokenizer(broken, capsys):
    folder = broken()
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    assert "tokenizer.json" in fails(capsys, "generate", "--model", str(folder), "--prompt", "once")


def test_model_that_is_a_file_or_missing(checkpoints, capsys, tmp_path):
    assert "not a checkpoint folder" in fails(capsys, "generate", "--model", str(checkpoints["plain"] / "config.json"),
                                              "--ids", "1")
    assert "not a checkpoint folder" in fails(capsys, "generate", "--model", str(tmp_path / "nothing"), "--ids", "1")


# ------------------------------------------------------------------ generate: bad flag values
@pytest.mark.parametrize("flags,culprit", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--threads", "0"], "--threads"),
    (["--speculative", "2"], "MTP"),  # the plain checkpoint has no MTP block
    (["--dtype", "int8"], "--dtype"),
    (["--max-new-tokens", "many"], "--max-new-tokens"),
])
def test_bad_generate_flags(checkpoints, capsys, flags, culprit):
    assert culprit in fails(capsys, "generate", "--model", str(checkpoints["plain"]), "--ids", "1,2", *flags)


def test_prompt_and_ids_together_or_neither(checkpoints, capsys):
    folder = str(checkpoints["plain"])
    assert "exactly one" in fails(capsys, "generate", "--model", folder, "--ids", "1", "--prompt", "x")
    assert "exactly one" in fails(capsys, "generate", "--model", folder)
    assert "--ids" in fails(capsys, "generate", "--model", folder, "--ids", ",")


def test_prompt_longer_than_the_model_can_hold(broken, capsys):
    folder = broken()
    _edit_config(folder, max_position_embeddings=8)
    assert "max_seq_len" in fails(capsys, "generate", "--model", str(folder), "--ids", "1,2,3,4,5",
                                  "--max-new-tokens", "10")


# ------------------------------------------------------------------ info
def test_info_on_broken_inputs(broken, capsys, tmp_path):
    folder = broken()
    (folder / "config.json").write_text("[1, 2]")
    assert "config.json" in fails(capsys, "info", str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in fails(capsys, "info", str(empty))
    assert "neither a preset" in fails(capsys, "info", "no-such-model")


# ------------------------------------------------------------------ pretrain: flags, configs, data
QUICK = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-problems", "0", "--tokenizer-sample", "60"]


@pytest.mark.parametrize("flags,culprit", [
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "1"], "--seq-len"),
    (["--batch-size", "16", "--micro-batch-size", "3"], "--micro-batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--eval-every", "0"], "--eval-every"),
    (["--vocab-size", "100"], "--vocab-size"),
    (["--betas", "1.5", "0.9"], "--betas"),
    (["--difficulty", "0"], "--difficulty"),
    (["--nvfp4-off", "sr"], "--nvfp4"),
    (["--nvfp4", "--nvfp4-high-precision-tail", "1.5"], "--nvfp4-high-precision-tail"),
    (["--nvfp4-off", "everything"], "--nvfp4-off"),
    (["--decay-shape", "cosine"], "--decay-shape"),
    (["--config", "no-such-preset"], "neither a preset"),
])
def test_bad_pretrain_flags(capsys, tmp_path, flags, culprit):
    assert culprit in fails(capsys, "pretrain", "--out", str(tmp_path / "o"), *flags)


def test_pretrain_config_file_broken(broken, capsys, tmp_path):
    folder = broken()
    (folder / "config.json").write_text("{oops")
    assert "config.json" in fails(capsys, "pretrain", "--config", str(folder), "--out", str(tmp_path / "o"))
    _edit_config_file = folder / "config.json"
    _edit_config_file.write_text(json.dumps({"hybrid_override_pattern": "M*", "hidden_size": 0}))
    assert "hidden_size" in fails(capsys, "pretrain", "--config", str(_edit_config_file), "--out", str(tmp_path / "o"))


def test_pretrain_on_bad_data_files(capsys, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "latin1.txt" in fails(capsys, "pretrain", "--data", str(latin1), "--out", str(tmp_path / "o"), *QUICK)
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert f"{lines}:2" in fails(capsys, "pretrain", "--data", str(lines), "--out", str(tmp_path / "o"), *QUICK)
    parquet = tmp_path / "corrupt.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet PAR1")
    assert "corrupt.parquet" in fails(capsys, "pretrain", "--data", str(parquet), "--out", str(tmp_path / "o"), *QUICK)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in fails(capsys, "pretrain", "--data", str(empty), "--out", str(tmp_path / "o"), *QUICK)


def test_out_that_is_a_file(capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert "taken" in fails(capsys, "pretrain", "--out", str(out), *QUICK)


def test_resume_refuses_a_changed_run_and_a_damaged_state(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--save-every", "1", *QUICK]) == 0
    capsys.readouterr()
    err = fails(capsys, "pretrain", "--out", str(out), "--resume", "--steps", "5")
    assert "--steps 5" in err and "saved: 2" in err
    (out / "step-000001" / "trainer_state.pt").write_bytes(b"garbage")
    assert "trainer_state.pt" in fails(capsys, "pretrain", "--out", str(out), "--resume")


def test_debug_shows_the_traceback(capsys, tmp_path):
    assert main(["pretrain", "--debug", "--steps", "0", "--out", str(tmp_path / "o")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_run_checks_its_flags_like_pretrain(capsys, tmp_path):
    assert "--seq-len" in fails(capsys, "run", "--seq-len", "0", "--out", str(tmp_path / "o"))
    assert "no-such-file" in fails(capsys, "run", "--data", str(tmp_path / "no-such-file.txt"),
                                   "--out", str(tmp_path / "o"), *QUICK)
