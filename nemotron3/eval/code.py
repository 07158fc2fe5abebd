"""The code format: a generated program passes when the item's tests run after it without an error, in time.

The program and the tests (the item's `answer`: Python that raises, e.g. `assert f(2) == 4`, when the program is
wrong) are written to one file in a fresh temporary folder and run as `python -I FILE` (isolated mode: no
PYTHON* variables, no user site, not the current folder on the path) with that folder as the working directory,
a minimal environment (no proxy variables, HOME the temporary folder) and, in the child before it starts, resource
limits (`resource.setrlimit`): CPU seconds, address space, file size, no core dumps. The child leads a session of
its own, so at the wall-clock limit the whole process group is killed, whatever the program spawned.

This is containment against accidents (an endless loop, a memory blow-up, a stray download through a proxy),
not a sandbox: the program can still read the user's files and open sockets. Code from an untrusted model
belongs in a real sandbox (a container or a VM without network, e.g. `docker run --network none`, or
`bwrap --unshare-net`); docs/evaluation.md says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MEMORY_BYTES = 2 << 30  # address space of the child: enough for the interpreter and ordinary tests
FILE_BYTES = 16 << 20


@dataclass
class CodeResult:
    passed: bool
    detail: str  # "passed", "timeout after Ns", or the exit status and the last line of stderr


def _limits(seconds: float) -> None:  # runs in the child between fork and exec
    import resource

    cpu = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_tests(program: str | None, tests: str, timeout: float = 10.0) -> CodeResult:
    """Run `program` followed by `tests` in a subprocess; passed when it exits 0 within `timeout` seconds."""
    if program is None:
        return CodeResult(False, "no program in the completion")
    with tempfile.TemporaryDirectory(prefix="nemotron3-code-") as tmp:
        path = Path(tmp) / "solution_test.py"
        path.write_text(program.rstrip() + "\n\n\n" + tests.rstrip() + "\n", encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=lambda: _limits(timeout))  # the child runs no threads: preexec is safe
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return CodeResult(False, f"timeout after {timeout:g}s")
        finally:
            if proc.poll() is None:  # an exception other than the timeout: leave nothing running
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode == 0:
        return CodeResult(True, "passed")
    last = (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
    return CodeResult(False, f"exit {proc.returncode}: {last}" if last else f"exit {proc.returncode}")


def run_many(jobs: list[tuple[str | None, str]], timeout: float = 10.0, workers: int | None = None
             ) -> list[CodeResult]:
    """`run_tests` for each (program, tests), a few at a time (each is its own process)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], timeout), jobs))
