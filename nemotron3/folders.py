"""Output folders: written whole or not at all, put back together after a kill at any point, readable by whoever
the umask lets read them, and never written over another run or the checkpoint a command reads.

**The swap** (`write_folder(dest, fill)`): `fill` writes into a hidden sibling `.tmp-NAME-TAG/`; the marker file
`.complete` is written into it last; then two renames, `dest` -> `.old-NAME-TAG` and `.tmp-NAME-TAG` -> `dest`;
then the marker and the old copy are deleted. A kill can stop this anywhere, and `recover(dest)`, which the next
save of `dest` and every command's start run, finishes or rolls back what it finds:

    found after the kill                          recover
    a .tmp- copy without the marker               delete it: half written (dest, if any, is untouched)
    a complete .tmp- copy, dest present           delete it: the swap had not begun (roll back)
    a complete .tmp- copy, dest missing           rename it to dest (finish)
    an .old- copy, dest present                   delete it: the swap had finished
    an .old- copy, dest missing, no new copy      rename it back to dest (roll back)

An `.old-` copy is always complete: it is a published folder renamed whole. Folders left by earlier versions
(`.old-NAME-TAG/NAME/` of checkpoint saves, `.NAME.old-PID` and `.NAME.writing-TAG` of `quantize`) are recovered
the same way.

**Modes.** The temporary folder is made with `os.mkdir`, not `tempfile.mkdtemp` (0700), and every file in it gets
the mode the umask gives (`umask_modes`): some writers (safetensors) create their files 0600 whatever the umask.
Under umask 022 a checkpoint is 0755 with 0644 files, so a server running as another user can read it.

**Other runs.** `run_marks(folder)` lists what makes a folder another run's or a checkpoint (summary.json, run.json,
metrics.jsonl, final/, step-NNNNNN/, config.json, weights); the commands refuse such an `--out` unless `--overwrite`
(train/checkpoint.py, quantize.py, run/stages.py), and never delete a folder that holds their `--model`. The rule,
for users: docs/architecture.md §7, "Output folders".
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER = ".complete"
STEP_RE = re.compile(r"^step-\d+$")
RUN_FILES = ("summary.json", "run.json", "metrics.jsonl", "config.json", "trainer_state.pt",
             "model.safetensors.index.json")
_NEW, _OLD = ".tmp-", ".old-"
_TAGGED = re.compile(r"^\.(tmp|old)-(.+)-[A-Za-z0-9_]+$")
_LEGACY = re.compile(r"^\.(.+)\.(writing-[A-Za-z0-9_]{8}|old-\d+)$")  # quantize's `.NAME.writing-TAG`, `.NAME.old-PID`


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status): setting it to read it
    back would give files another thread creates meanwhile the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(root: str | os.PathLike, paths: Iterable[Path] | None = None) -> None:
    """Give `root` and everything under it (or only `paths`) the modes the umask gives new folders (0777 & ~umask)
    and files (0666 & ~umask)."""
    mask = current_umask()
    root = Path(root)
    todo = list(paths) if paths is not None else [root, *root.rglob("*")]
    for p in todo:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new folder `parent/PREFIX-TAG` with the umask's mode (mkdtemp would make it 0700)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _pending(name: str) -> tuple[str, str] | None:
    """(kind, dest name) of a swap's leftover: kind "new" (a copy being written) or "old" (the replaced copy)."""
    if m := _TAGGED.match(name):
        return ("new" if m[1] == "tmp" else "old"), m[2]
    if m := _LEGACY.match(name):
        return ("new" if m[2].startswith("writing") else "old"), m[1]
    return None


def _old_copy(old: Path, name: str) -> Path | None:
    """The folder an `.old-` leftover keeps: itself, or its one entry `NAME/` (the layout of earlier versions);
    None for an empty one (a kill before anything was moved into it)."""
    entries = list(old.iterdir()) if old.is_dir() else []
    if len(entries) == 1 and entries[0].name == name and entries[0].is_dir():
        return entries[0]
    return old if entries else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def recover(dest: str | os.PathLike) -> None:
    """Finish or roll back a swap of `dest` that a kill interrupted (the table in the module docstring); then
    delete what is left of it. Nothing is deleted while `dest` is missing and a complete copy could restore it."""
    dest = Path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return
    found = [(p, *k) for p in parent.iterdir()
             if (k := _pending(p.name)) is not None and k[1] == dest.name and p.is_dir() and not p.is_symlink()]
    news = sorted((p for p, kind, _ in found if kind == "new"), key=_mtime, reverse=True)
    olds = sorted((p for p, kind, _ in found if kind == "old"), key=_mtime, reverse=True)
    if not dest.exists():
        candidates = [p for p in news if (p / MARKER).is_file()]
        candidates += [c for p in olds if (c := _old_copy(p, dest.name)) is not None]
        for src in candidates:
            try:
                os.rename(src, dest)
            except FileNotFoundError:
                continue  # another process (a rank of the same run) moved it first
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            break
    if dest.is_dir():
        (dest / MARKER).unlink(missing_ok=True)
    if dest.exists():
        garbage = news + olds
    else:  # nothing could restore it: only what is incomplete goes
        garbage = [p for p in news if not (p / MARKER).is_file()]
        garbage += [p for p in olds if _old_copy(p, dest.name) is None]
    for p in garbage:
        shutil.rmtree(p, ignore_errors=True)


def recover_all(parent: str | os.PathLike) -> None:
    """`recover` every folder in `parent` whose swap a kill interrupted (a kill right after the last rename leaves
only the marker in the new folder)."""
    parent = Path(parent)
    if parent.is_dir():
        names = {k[1] for p in parent.iterdir() if (k := _pending(p.name)) is not None and p.is_dir()}
        names |= {p.name for p in parent.iterdir() if _pending(p.name) is None and (p / MARKER).is_file()}
        for name in sorted(names):
            recover(parent / name)


def write_folder(dest: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write the folder `dest` whole or not at all: `fill(tmp)` writes its content into a temporary sibling, which
    then replaces `dest` (module docstring). An error in `fill` leaves `dest` as it was and no temporary."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    tmp = _fresh_dir(dest.parent, f"{_NEW}{dest.name}-")
    try:
        fill(tmp)
        umask_modes(tmp)
        with open(tmp / MARKER, "wb") as f:
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.parent / f"{_OLD}{dest.name}-{tmp.name.rsplit('-', 1)[1]}" if dest.exists() else None
    try:
        if old is not None:
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        try:
            recover(dest)  # put back whichever copy is complete; a failure here leaves it to the next start
        except OSError:
            pass
        raise
    (dest / MARKER).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def run_marks(folder: str | os.PathLike) -> list[str]:
    """What in `folder` belongs to a run or a checkpoint: summary.json, run.json, metrics.jsonl, final/,
    step-NNNNNN/, config.json, trainer_state.pt, weights, unless empty (none when the folder is missing or empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    marks = []
    for p in sorted(folder.iterdir()):
        try:
            if p.is_dir() and (p.name == "final" or STEP_RE.match(p.name)):
                marks.append(p.name + "/")
            elif p.is_file() and (p.name in RUN_FILES or p.name.endswith(".safetensors")) and p.stat().st_size:
                marks.append(p.name)  # (an empty file, such as the metrics.jsonl of a run that failed at once, is none)
        except FileNotFoundError:  # removed meanwhile (rank 0 of the same run, clearing it for --overwrite)
            continue
    return marks


def within(path: str | os.PathLike, folder: str | os.PathLike) -> Path | None:
    """`path` relative to `folder` when `path` is `folder` or lies inside it (after resolving links), else None."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p.relative_to(f) if p == f or f in p.parents else None
