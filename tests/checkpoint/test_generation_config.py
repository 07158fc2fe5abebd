"""generation_config.json of a saved checkpoint: `eos_token_id` holds `</s>` and, when the folder has a tokenizer,
its template's end-of-turn marker (`<|im_end|>`), so transformers' `generate` on a chat prompt stops where the
engine does."""

from __future__ import annotations

import json

import pytest
from conftest import small_model

from nemotron3 import checkpoint
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(200, seed=0), vocab_size=400)


def test_eos_holds_the_end_of_turn_marker(tok, tmp_path):
    model = small_model(-(-tok.vocab_size // 64) * 64)
    checkpoint.save(model, tmp_path / "with", tok)
    im_end = tok.tk.token_to_id("<|im_end|>")
    assert json.loads((tmp_path / "with" / "generation_config.json").read_text())["eos_token_id"] == [2, im_end]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "with").eos_token_id == [2, im_end]
    checkpoint.save(model, tmp_path / "without")  # no tokenizer: the model config's eos alone
    assert json.loads((tmp_path / "without" / "generation_config.json").read_text())["eos_token_id"] == 2
