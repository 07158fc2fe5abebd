#!/usr/bin/env python
"""Mutation testing of one module (or package) of nemotron3 with mutmut, against the tests that cover it.

    tools/mutate.sh nemotron3/tasks                # every mutant of the package, with its covering tests
    tools/mutate.sh nemotron3/engine/cache.py      # one file
    tools/mutate.sh nemotron3/model/moe.py --tests tests/model/test_moe.py   # a module with no entry in COVERING
    tools/mutate.sh nemotron3/engine/speculative.py --only '*x_accept*'  # only the mutants of changed functions

mutmut (pinned in the `test` extra) rewrites every function of the module into small variants ("mutants":
`<` for `<=`, `+ 1` for `- 1`, a dropped call, a changed constant, ...), then runs, for each mutant, only
the tests that executed the mutated function. A mutant is *killed* when a test fails, *survived* when every
test passes: a survivor is a change of behaviour the suite cannot see, to be killed by a new test or argued
equivalent in docs/testing.md.

The run happens in a copy of the repository under `.mutants/<module>/` (git-ignored), never in the working
tree: the copy gets a `[tool.mutmut]` section naming the module and its covering tests (COVERING below: the
smallest selection that covers the module, so a run takes minutes on two cores). The process lowers its own
priority (nice 15) and runs one test process at a time with OMP_NUM_THREADS=1 unless told otherwise.
Output: mutmut's per-mutant lines, then `killed / survived / ...` counts and the survivors' names
(`mutmut show <name>` inside `.mutants/<module>/` prints a survivor's diff).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module (file or package, relative to the repository) -> the test files that cover it
COVERING: dict[str, list[str]] = {
    "nemotron3/tasks": ["tests/tasks/test_tasks.py", "tests/tasks/test_tasks_reference.py",
                        "tests/tasks/test_tasks_distribution_spec.py", "tests/tasks/test_tasks_registry_spec.py"],
    "nemotron3/train/data.py": ["tests/train/test_data.py", "tests/train/test_loss_mask.py",
                                "tests/train/test_data_sources_and_order.py"],
    "nemotron3/train/loss.py": ["tests/train/test_loss_mask.py"],
    # the in-process end-to-end resume (tests/checkpoint/test_checkpoint_rng.py) takes ~30 s a run: left to the suite
    "nemotron3/train/checkpoint.py": [
        "tests/checkpoint/test_checkpoint_files.py", "tests/checkpoint/test_checkpoint_failures.py",
        "tests/checkpoint/test_checkpoint_rng.py::test_rng_state_restores_every_stream_and_each_generator_by_name"],
    "nemotron3/engine/cache.py": ["tests/engine/test_cache.py", "tests/engine/test_cache_rollback.py",
                                  "tests/engine/test_engine_model.py", "tests/engine/test_cache_rows.py"],
    # micro-model and hand-built-tensor tests (~8 s); test_speculative_oracle.py (~2 min, the tiny preset) and
    # test_engine_speculative.py (minutes: greedy for k = 1..5, the chi-square law) are left to the suite
    "nemotron3/engine/speculative.py": ["tests/engine/test_speculative_accept.py",
                                        "tests/engine/test_speculative_rounds.py"],
    "nemotron3/quant/nvfp4.py": ["tests/quant/test_quant_formats.py", "tests/quant/test_nvfp4_scales.py",
                                 "tests/quant/test_nvfp4_branches.py"],
    "nemotron3/model/moe.py": ["tests/model/test_moe.py", "tests/model/test_moe_groups.py"],
}


def covering_tests(module: str) -> list[str]:
    """The test files of the longest COVERING entry that contains `module`."""
    module = module.rstrip("/")
    best = max((k for k in COVERING if module == k or module.startswith(k + "/")), key=len, default=None)
    if best is None:
        raise SystemExit(f"no covering tests known for {module}; pass --tests tests/PACKAGE/test_x.py ... "
                         f"(or add it to COVERING in {Path(__file__).relative_to(ROOT)})")
    return COVERING[best]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(module: str, tests: list[str], work: Path) -> None:
    """A fresh copy of the package, the tests and pyproject.toml in `work`, configured for mutmut."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "nemotron3", work / "nemotron3", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    only = f"{module}/*" if (ROOT / module).is_dir() else module
    config = (
        "\n\n[tool.mutmut]\n"
        'source_paths = ["nemotron3"]\n'  # the whole package is copied (imports), only `only_mutate` is mutated
        f"only_mutate = {_toml_list([only])}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider"]\n'
        "use_git_change_detection = false\n"
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + config)


def counts(work: Path) -> dict:
    """mutmut's own summary (`mutmut export-cicd-stats`) and the survivors' names."""
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    out = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, capture_output=True, text=True)
    survivors = [ln.split(":")[0].strip() for ln in out.stdout.splitlines() if ln.strip().endswith("survived")]
    return {**stats, "survivor_names": survivors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="a file or package, e.g. nemotron3/tasks or nemotron3/engine/cache.py")
    ap.add_argument("--tests", nargs="+", help="the covering test files (default: COVERING's entry)")
    ap.add_argument("--only", nargs="+", default=[], metavar="GLOB",
                    help="mutant names to run (fnmatch globs, e.g. '*x_accept*': the functions you changed)")
    ap.add_argument("--max-children", type=int, default=1, help="test processes at once (default 1)")
    ap.add_argument("--nice", type=int, default=15, help="added niceness (default 15: the cores are shared)")
    args = ap.parse_args(argv)
    module = args.module.rstrip("/")
    if not (ROOT / module).exists():
        raise SystemExit(f"{module}: no such file or package in {ROOT}")
    tests = args.tests or covering_tests(module)
    missing = [t for t in tests if not (ROOT / t.split("::")[0]).is_file()]
    if missing:
        raise SystemExit(f"covering test files not found: {', '.join(missing)}")
    work = ROOT / ".mutants" / module.replace("/", "_").removesuffix(".py")
    prepare(module, tests, work)
    os.nice(args.nice)
    # no PYTHONPATH to the mutants: an entry made before mutmut creates the folder leaves a stale import cache,
    # and the tests would silently import the unmutated package (so tests that spawn `python -m nemotron3`
    # do not see mutants: cover a module with in-process tests)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"mutating {module} against {' '.join(tests)} in {work}", flush=True)
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
                          *args.only], cwd=work, env=env)
    if run.returncode != 0:
        return run.returncode
    subprocess.run([sys.executable, "-m", "mutmut", "export-cicd-stats"], cwd=work, env=env, check=True,
                   capture_output=True)
    c = counts(work)
    print(f"\n{module}: killed {c['killed']}, survived {c['survived']}, timeout {c.get('timeout', 0)}, "
          f"no tests {c.get('no_tests', 0)}, total {c['total']}")
    for name in c["survivor_names"]:
        print(f"  survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
