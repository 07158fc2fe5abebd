"""Tool conversations in pretraining's task text (PretrainConfig.tool_share, stages/pretrain.py `tokenizer_sample`):
their share of the task tokens is the one asked, the tokenizer's sample has the same blend (so the tool-format
tokens it learns are trained in pretraining), 0 gives the task text alone, and a run saved before the field
existed resumes without tool text."""

from __future__ import annotations

import pytest
from rich.console import Console

from nemotron3.options import ConfigError
from nemotron3.stages import pretrain
from nemotron3.stages.pretrain import PretrainConfig
from nemotron3.train import data as train_data

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(steps=40, batch_size=8, seq_len=128, tokenizer_sample=600, eval_problems=0)


def _is_tool(text: str) -> bool:
    return "<tool_call>" in text


@pytest.mark.parametrize("share", [0.05, 0.2])
def test_task_text_holds_tool_conversations_at_the_share_of_tokens(share):
    cfg = PretrainConfig(**SMALL, tool_share=share)
    tok, _, task_train, _ = pretrain._corpus(cfg, Console(quiet=True), None, 1024)
    lengths = [len(ids) + 2 for ids in tok.encode_batch(task_train)]  # + <s> and </s>, as the packer adds
    tools = sum(n for n, t in zip(lengths, task_train) if _is_tool(t))
    assert tools / sum(lengths) == pytest.approx(share, abs=0.02)
    assert sum(lengths) >= cfg.task_tokens()  # enough text for the run (5 % spare)
    sample = pretrain.tokenizer_sample(cfg)
    sample_tools = sum(len(t) for t in sample if _is_tool(t))
    assert sample_tools / sum(map(len, sample)) == pytest.approx(share, abs=0.02)  # the same blend, in characters
    # every token the tool conversations of the sample use occurs in the training text
    used = {i for ids in tok.encode_batch(task_train) for i in ids}
    assert {i for t in sample if _is_tool(t) for i in tok.encode(t)} <= used


def test_tool_share_zero_is_the_task_text_alone():
    cfg = PretrainConfig(**SMALL, tool_share=0.0)
    sample = pretrain.tokenizer_sample(cfg)
    assert sample == train_data.task_texts(cfg.tokenizer_sample, cfg.seed, "train", cfg.difficulty)
    _, _, task_train, _ = pretrain._corpus(cfg, Console(quiet=True), None, 1024)
    assert task_train and not any(map(_is_tool, task_train))


def test_tool_share_is_bounded_and_restores_to_zero_for_older_runs(tmp_path):
    with pytest.raises(ConfigError, match="tool"):
        PretrainConfig(tool_share=0.9)
    saved = pretrain.to_dict(PretrainConfig(**SMALL))
    del saved["tool_share"]  # a run saved before the field existed read no tool text
    restored = pretrain.restore(PretrainConfig(out=tmp_path, resume=True), saved, tmp_path)
    assert restored.tool_share == 0.0
