"""`nemotron3 <command>`: every subcommand, its flags built from its stage's config dataclass.

Each command is a stage module with a config dataclass (fields declared with `nemotron3.options.option`) and a
`main(cfg) -> int` that runs the stage and prints its report; the stage's logic is a plain function of the
config (`nemotron3.stages.pretrain.pretrain(cfg)`), which the pipeline and the tests call directly. A field becomes a
flag (`seq_len` -> `--seq-len`, booleans as `--x/--no-x`, lists as several values), with the dataclass's
default, so every default lives in one place; only the flags a user gives reach the dataclass.

Errors: a wrong flag, config field, checkpoint or data file ends in one line, `error: ...`, naming the culprit,
and exit status 1 (argparse's own usage errors: 2); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any

from nemotron3.options import flag_of, optional_inner

# command -> (stage module, config class, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("nemotron3.run", "RunConfig", "the main job: the whole recipe on the embedded default"),
    "info": ("nemotron3.stages.info", "InfoConfig", "describe presets, config.json files or checkpoint folders"),
    "pretrain": ("nemotron3.stages.pretrain", "PretrainConfig",
                 "pretrain a model (NVFP4 recipe, MTP) on the embedded tasks or your text"),
    "sft": ("nemotron3.stages.sft", "SFTConfig",
            "supervised fine-tuning on chat conversations, reasoning on / off / budgeted, loss on the assistant"),
    "rl": ("nemotron3.rl.grpo", "GRPOConfig", "GRPO / iGRPO on verifiable rewards, rollouts with MTP speculation"),
    "generate": ("nemotron3.stages.generate", "GenerateConfig", "generate text from a checkpoint"),
    "serve": ("nemotron3.serve", "ServeConfig", "an OpenAI-compatible server with continuous batching and a chat page"),
    "chat": ("nemotron3.stages.chat_cli", "ChatConfig",
             "chat with a checkpoint in the terminal (/think, /no_think, /budget)"),
    "quantize": ("nemotron3.stages.quantize", "QuantizeConfig",
                 "write a checkpoint in NVFP4 / FP8 (compressed-tensors), MX9/6/4, MXFP4 or SeedLM"),
    "export": ("nemotron3.export", "ExportConfig", "write a checkpoint as a GGUF file for llama.cpp (f32, bf16, q8_0)"),
    "eval": ("nemotron3.eval.stage", "EvalConfig",
             "score a checkpoint on a benchmark file or the built-in tasks: per reasoning mode, pass@k, tokens"),
}
# Commands that hand their arguments to another program's command line: command -> (module, function, help).
PASSTHROUGH: dict[str, tuple[str, str, str]] = {
    "lm-eval": ("nemotron3.eval.harness", "cli_main",
                "lm-evaluation-harness's command line with the nemotron3 model registered (the `eval` extra)"),
}

# What a command may fail with that is the user's to fix: shown as one line, not a traceback. ValueError covers
# ConfigError, CheckpointError, DataError and the checks of ModelConfig and the Engine; OSError a missing file, a
# full disk or a permission; NotImplementedError a combination of features that is not supported (yet).
EXPECTED_ERRORS = (ValueError, OSError, NotImplementedError)


def _groups(parser: argparse.ArgumentParser, config_cls: type) -> dict[str, Any]:
    """An argument group per class of the config's hierarchy that declares fields, the most derived first
    (`PretrainConfig`'s own flags, then the training loop's)."""
    groups: dict[str, Any] = {}
    for cls in config_cls.__mro__:
        own = [name for name in vars(cls).get("__annotations__", {}) if name not in groups]
        if own and dataclasses.is_dataclass(cls):
            title = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
            group = parser.add_argument_group(f"{title} ({cls.__name__})")
            for name in own:
                groups[name] = group
    return groups


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argument per field of `config_cls`."""
    hints = typing.get_type_hints(config_cls)
    groups = _groups(parser, config_cls)
    for f in dataclasses.fields(config_cls):
        parser_or_group = groups.get(f.name, parser)
        meta = f.metadata
        hint, _ = optional_inner(hints[f.name])
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        text = (meta.get("help") or "").replace("%", "%%")
        if default is not dataclasses.MISSING and default is not None and default is not False and (
                default not in ([], (), "")):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        kw: dict[str, Any] = {"help": text}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("parse"):
            kw["type"] = str  # converted after parsing (see _config_from), so the parser's error reaches the user
        elif hint is bool:  # `--x` for a switch that is off by default, `--x/--no-x` otherwise
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            elem = args[0] if args else str
            kw["type"] = elem if elem in (int, float, str, Path) else str
            fixed = origin is tuple and len(args) > 1 and args[1] is not Ellipsis
            kw["nargs"] = len(args) if fixed else ("*" if meta.get("positional") else "+")
            if origin is list and not meta.get("positional"):
                kw["action"] = "extend"  # repeatable: `--env tasks --env tools:0.5` = `--env tasks tools:0.5`
        else:
            kw["type"] = hint if hint in (int, float, str, Path) else str
        if meta.get("choices") is not None:
            kw["choices"] = list(meta["choices"])
        if meta.get("positional"):
            parser_or_group.add_argument(f.name, **kw)
        else:
            if default is dataclasses.MISSING:
                kw["required"] = True
            parser_or_group.add_argument(flag_of(f), dest=f.name, **kw)


def _config_from(config_cls: type, given: dict[str, Any]) -> Any:
    """The dataclass from the flags a user gave (defaults are the dataclass's own)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {}
    for name, value in given.items():
        parse = fields[name].metadata.get("parse")
        values[name] = parse(value) if parse is not None and isinstance(value, str) else value
    return config_cls(**values)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in two lines instead of the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the flags)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = _Parser(prog="nemotron3", parents=[common], epilog="`nemotron3 COMMAND --help` lists a command's flags.",
                     description="Nemotron 3 hybrid Mamba-2 + attention LatentMoE models with MTP: pretraining "
                     "(NVFP4 recipe), supervised fine-tuning, generation, model description.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (module_name, config_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = (module, getattr(module, config_name))
        doc = (module.__doc__ or help_text).strip()
        p = sub.add_parser(name, help=help_text, description=doc, parents=[common], argument_default=argparse.SUPPRESS,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(p, modules[name][1])
    for name, (_, _, help_text) in PASSTHROUGH.items():  # listed in --help; main() hands them their arguments
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, modules


def _passthrough(name: str, argv: list[str]) -> int:
    """Run a PASSTHROUGH command; its module's missing dependency is one line naming the extra to install."""
    module_name, function, _ = PASSTHROUGH[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        print(f"error: nemotron3 {name} needs {e.name}: pip install 'nemotron3[eval]'", file=sys.stderr)
        return 1
    try:
        return int(getattr(module, function)(argv) or 0)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


_FORMAT_WARNING = warnings.formatwarning


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """Our own warnings (nemotron3's categories, e.g. a NaN weight found at load) as one line, `warning: ...`,
    like the errors; anyone else's as Python shows them."""
    if category.__module__.startswith("nemotron3"):
        return f"warning: {message}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    # Subnormal fp32 values (below 1.2e-38) are flushed to zero. The SSD's decays and a freshly initialised
    # model's gradients produce them, x86 computes with them about 100x slower (a training step went from 0.6 s
    # to 10 s), and no result here depends on numbers that small.
    import torch

    torch.set_flush_denormal(True)
    warnings.formatwarning = _format_warning
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] and given[0] in PASSTHROUGH:
        return _passthrough(given[0], given[1:])
    parser, modules = build_parser()
    args = vars(parser.parse_args(argv))
    command, debug = args.pop("command"), args.pop("debug", False)
    module, config_cls = modules[command]
    try:
        cfg = _config_from(config_cls, args)
        return int(module.main(cfg) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if debug:
            traceback.print_exc()
        message = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror}"
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
