"""`nemotron3 generate`: text through the folder's tokenizer.json, raw ids, and clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import eval_checkpoint, randomize_

import nemotron3
from nemotron3.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=300, num_nextn_predict_layers=0, eos_token_id=None)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["once upon a time there was a tiny model"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder, model, tok


def test_prompt_text_streams_the_engines_greedy_tokens(checkpoint, capsys):
    folder, model, tok = checkpoint
    assert main(["generate", "--model", str(folder), "--prompt", "once upon a time", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    want = nemotron3.Engine(model).generate([tok.encode("once upon a time").ids], 6).tokens[0]
    assert out.out.rstrip("\n") == tok.decode(want)
    assert "6 new" in out.err and "decode" in out.err


def test_raw_ids_and_sampling_flags(checkpoint, capsys):
    folder, model, _ = checkpoint
    argv = ["generate", "--model", str(folder), "--ids", "1,2,3", "--max-new-tokens", "4", "--temperature", "0.9",
            "--seed", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    want = nemotron3.Engine(model).generate([[1, 2, 3]], 4, temperature=0.9, seed=3).tokens[0]
    assert printed == ",".join(map(str, want)) + ","


def _error(capsys, *argv: str) -> str:
    assert main(["generate", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_errors_name_the_problem(checkpoint, tmp_path, capsys):
    folder, model, _ = checkpoint
    assert "outside the vocabulary" in _error(capsys, "--model", str(folder), "--ids", "1,999")
    assert "comma-separated" in _error(capsys, "--model", str(folder), "--ids", "1,x")
    bare = tmp_path / "bare"
    nemotron3.save_pretrained(model, bare)
    assert re.search("no tokenizer.json.*--ids", _error(capsys, "--model", str(bare), "--prompt", "hi"))
    assert "not a checkpoint folder" in _error(capsys, "--model", str(tmp_path / "missing"), "--ids", "1")


def test_a_model_with_projection_biases_generates(tmp_path, capsys):
    """mlp_bias / use_bias are valid nemotron_h settings: the command decodes them (reference cached path) and
    gives the greedy tokens of the full forward, one token at a time."""
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=300, mlp_bias=True, use_bias=True,
                                                          eos_token_id=None)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "conv1d" not in name:
                p.mul_(0.3)
    nemotron3.save_pretrained(model, tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--ids", "5,6,7", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    ids, want = [5, 6, 7], []
    with torch.no_grad():
        for _ in range(8):
            want.append(int(model(torch.tensor([ids + want]))[0, -1].argmax()))
    assert printed == ",".join(map(str, want)) + ","


def test_chat_prompt_and_thinking_budget(tmp_path):
    """--chat renders the prompt with the chat format; --max-thinking-tokens forces </think> in the output."""
    from nemotron3 import chat
    from nemotron3.stages.generate import GenerateConfig, generate

    model, tk = eval_checkpoint(tmp_path, text="What is 7 * 6? It is 42.\n")
    r = generate(GenerateConfig(model=tmp_path, prompt="What is 7 * 6?", chat=True, max_thinking_tokens=3,
                                max_new_tokens=12, no_stop=True))
    end = tk.tk.token_to_id("</think>")
    assert end in r.tokens[:4 + 1]  # 3 thinking tokens, a grace window of ceil(0.3) = 1, then forced
    # the prompt is <s> + the rendered turn, as every SFT conversation starts
    prompt = [tk.bos_id, *tk.tk.encode(chat.render([{"role": "user", "content": "What is 7 * 6?"}],
                                                   add_generation_prompt=True)).ids]
    free = nemotron3.Engine(model).generate([prompt], 12, stop_token_ids=[]).tokens[0]
    at = r.tokens.index(end)
    assert r.tokens[:at] == free[:at] and r.stats["thinking_forced"] == [1]
