"""`nemotron3 <command>`: the command-line entry point.

Each command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int | None`;
this file only lists them, so adding a command never means editing another command's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("nemotron3.commands.run", "the main job: the whole recipe on the embedded default"),
    "info": ("nemotron3.commands.info", "describe a preset, a config.json or a checkpoint folder"),
    "pretrain": ("nemotron3.train.cli", "pretrain a model (NVFP4 recipe, MTP) on the embedded tasks or your text"),
    "generate": ("nemotron3.engine.cli", "generate text from a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nemotron3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not (e.name and (module_name == e.name or module_name.startswith(e.name + "."))):
                raise  # a real missing dependency inside an existing command
            continue  # a command whose module is not written yet is simply not offered
        modules[name] = module
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
