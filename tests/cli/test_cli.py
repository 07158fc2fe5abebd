"""The command line is built from the stage dataclasses: the public flags exist, a flag sets exactly its field,
and everything not given takes the dataclass's default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nemotron3.cli import COMMANDS, _config_from, build_parser
from nemotron3.run import RunConfig
from nemotron3.stages.generate import GenerateConfig
from nemotron3.stages.pretrain import PretrainConfig
from nemotron3.stages.sft import SFTConfig

# flags that scripts outside this repository use: they must keep working
PUBLIC_FLAGS = {
    "pretrain": ["--config", "--data", "--tasks", "--no-tasks", "--nvfp4", "--nvfp4-off", "--nvfp4-high-precision-tail",
                 "--steps", "--batch-size", "--micro-batch-size", "--seq-len", "--lr", "--seed", "--difficulty",
                 "--vocab-size", "--bias-update-rate", "--seq-aux-coeff", "--mtp-depths", "--eval-every",
                 "--eval-problems", "--save-every", "--compile", "--out", "--resume", "--dp-shard", "--ep"],
    "generate": ["--model", "--prompt", "--ids", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                 "--no-stop", "--dtype", "--threads", "--compile", "--speculative", "--chat", "--no-think",
                 "--max-thinking-tokens"],
    "chat": ["--model", "--system", "--no-think", "--max-thinking-tokens", "--max-new-tokens", "--temperature",
             "--top-k", "--top-p", "--seed", "--speculative"],
    "sft": ["--model", "--out", "--data", "--steps", "--resume", "--tasks", "--batch-size", "--lr", "--seq-len",
            "--reasoning-off-share", "--budget-share", "--eval-problems", "--eval-budgets", "--save-every",
            "--dp-shard", "--ep"],
    "rl": ["--model", "--out", "--steps", "--algo", "--resume", "--num-generations", "--rollout-budget", "--num-drafts",
           "--reward-funcs", "--reward-weights", "--data", "--beta", "--epsilon", "--epsilon-high", "--loss-type",
           "--scale-rewards", "--leave-one-out", "--num-iterations", "--mask-truncated-completions",
           "--skip-zero-variance-groups", "--speculative", "--max-thinking-tokens", "--temperature"],
    "run": ["--out", "--steps", "--nvfp4", "--no-nvfp4", "--resume", "--budget-minutes", "--stages", "--seed"],
    "info": [],
    "serve": ["--model", "--host", "--port", "--api-key", "--speculative", "--max-batch", "--token-budget"],
    "quantize": ["--model", "--out", "--scheme", "--calib"],
    "export": ["--model", "--format", "--outtype", "--out"],
    "eval": ["--model", "--data", "--format", "--modes", "--n", "--out"],
}


def parse(argv: list[str]):
    parser, modules = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    args.pop("debug", None)
    return _config_from(modules[command][1], args)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_public_flags_exist(command):
    parser, _ = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert set(PUBLIC_FLAGS[command]) <= flags, set(PUBLIC_FLAGS[command]) - flags


def test_unset_flags_take_the_dataclass_defaults():
    assert parse(["pretrain"]) == PretrainConfig()
    assert parse(["run"]) == RunConfig() and RunConfig().out == Path("runs/latest")
    assert parse(["sft"]) == SFTConfig()
    assert parse(["generate", "--model", "m", "--ids", "1"]) == GenerateConfig(model=Path("m"), ids=[1])


def test_each_flag_sets_its_field():
    cfg = parse(["pretrain", "--steps", "7", "--lr", "1e-3", "--nvfp4", "--nvfp4-off", "rht", "sr", "--data", "a.txt",
                 "b.jsonl", "--no-tasks", "--betas", "0.8", "0.9", "--out", "x", "--nvfp4-high-precision-tail", "0.2"])
    want = dataclasses.replace(PretrainConfig(), steps=7, lr=1e-3, nvfp4=True, nvfp4_off=["rht", "sr"],
                               data=[Path("a.txt"), Path("b.jsonl")], tasks=False, betas=(0.8, 0.9), out=Path("x"),
                               nvfp4_high_precision_tail=0.2)
    assert cfg == want
    cfg = parse(["sft", "--model", "m", "--data", "a.jsonl", "--steps", "3", "--budget-share", "0.3",
                 "--eval-budgets", "4", "16", "--resume"])
    assert cfg == dataclasses.replace(SFTConfig(), model=Path("m"), data=[Path("a.jsonl")], steps=3, budget_share=0.3,
                                      eval_budgets=[4, 16], resume=True)
    cfg = parse(["generate", "--model", "m", "--prompt", "hi", "--temperature", "0.7", "--no-stop", "--speculative",
                 "2", "--seed", "5"])
    assert (cfg.prompt, cfg.temperature, cfg.no_stop, cfg.speculative, cfg.seed, cfg.ids) == ("hi", 0.7, True, 2, 5,
                                                                                             None)


def test_every_field_is_a_flag():
    parser, modules = build_parser()
    for command, (_, config_cls) in modules.items():
        sub = parser._subparsers._group_actions[0].choices[command]
        dests = {a.dest for a in sub._actions}
        fields = {f.name for f in dataclasses.fields(config_cls)}
        assert fields <= dests, (command, fields - dests)
