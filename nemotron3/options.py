"""Stage configurations: dataclass fields that double as command-line flags, and the one way they are checked.

Every stage (`pretrain`, `generate`, `info`, `run`, and later `sft`, `rl`, `serve`, ...) is a function of one
config dataclass. Its fields are declared with `option(default, help, ...)`, so the default and the help text
live in one place; `nemotron3/cli.py` turns the fields into flags (`seq_len` -> `--seq-len`) and builds the
dataclass from the flags a user gave. Checks run in the dataclass itself (`__post_init__`), so a config built
from Python is checked exactly like one built from the command line:

    @dataclass
    class MyConfig(StageConfig):
        steps: int = option(300, "optimizer steps", min=1)

    MyConfig(steps=0)   # ConfigError: steps (--steps) = 0: must be >= 1

`check_fields` checks every field's type against its annotation (`int`, `float` (ints accepted), `bool`,
`str`, `Path` (strings accepted), `X | None`, `list[X]`, `tuple[X, ...]`) and the `min` / `max` / `choices`
of its option. Two bounds hold for every number whatever its option says: a float is finite (NaN and ±inf are
never a setting; NaN would also pass every `min` / `max` comparison), and an int fits in 64 bits (torch's
sizes and indices; beyond, the first tensor would fail with an OverflowError). Sizes that decide how much memory
a stage holds are bounded by the machine itself: `check_fits` refuses a field when a lower bound of the bytes
it makes the stage hold exceeds the machine's physical memory (`memory_bytes`), before anything is allocated.

`to_dict` gives a config's JSON form with the stage it belongs to (`stage`); `from_dict` rebuilds a config from
it (what `--resume` reads back) and refuses another stage's configuration by name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def derive_seed(seed: int, index: int) -> int:
    """The seed of stream `index` of `seed`, `(seed · 1,000,003 + index) mod (2^63 − 1)`: the one rule by which
    every derived seed is made (the engine's per-row sampling streams, RL's per-step seeds and prompts, the NVFP4
    stochastic-rounding stream of each quantized layer)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


class ConfigError(ValueError):
    """A configuration field has a wrong type or value; the message names the field and its flag."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    choices: typing.Sequence[Any] | None = None,
    positional: bool = False,
    metavar: str | None = None,
    parse: typing.Callable[[str], Any] | None = None,
    infinite: bool = False,
    check: typing.Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with what the CLI and the checks need.

    default: the value (lists are copied per instance); omit it for a required field. min / max: inclusive
    bounds of a number (or of each element of a list). choices: allowed values (of each element of a list).
    positional: a positional argument instead of a flag. parse: turns the flag's one string into the field's
    value (e.g. `"1,2,3"` -> [1, 2, 3]); its errors reach the user as they are. infinite: a float field that
    gives ±inf a meaning opts in with True (NaN is refused all the same); by default a float must be finite.
    check: a value's own rule beyond these, `value -> None` when it holds, else what is wrong (in words), which
    `check_fields` reports as `name (--flag) = value: words` (e.g. `device_option`'s `cuda:N` syntax).
    """
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices is not None else None,
            "positional": positional, "metavar": metavar, "parse": parse, "infinite": infinite, "check": check}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--seq-len` for `seq_len`."""
    return "--" + f.name.replace("_", "-")


def describe(f: dataclasses.Field) -> str:
    """`name (--flag)`: how error messages name a field, for Python and command-line users alike."""
    return f"{f.name} ({flag_of(f)})"


def _parts(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """(origin, args) of a type hint, with `X | None` spelt either way."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType:
        origin = typing.Union
    return origin, typing.get_args(hint)


def optional_inner(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    origin, args = _parts(hint)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        # a Union built at run time from a tuple: `X | Y` has no such form, and would print differently
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return hint, False


def _type_name(hint: Any) -> str:
    inner, optional = optional_inner(hint)
    origin, args = _parts(inner)
    if origin in (list, tuple):
        base = f"a list of {_type_name(args[0])} values" if args else "a list"
    elif inner is bool:
        base = "true or false"
    elif inner is int:
        base = "an integer"
    elif inner is float:
        base = "a number"
    elif inner is str:
        base = "a string"
    elif inner is Path:
        base = "a path"
    else:
        base = getattr(inner, "__name__", str(inner))
    return base + (" or null" if optional else "")


def coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` names, or raise TypeError. Lossless conversions only: int -> float,
    str -> Path, list -> tuple; a bool is never taken for a number, nor a number for a bool."""
    inner, optional = optional_inner(hint)
    if value is None:
        if optional:
            return None
        raise TypeError
    origin, args = _parts(inner)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        elem = args[0] if args else Any
        items = [v if elem is Any else coerce(v, elem) for v in value]
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis and len(items) != len(args):
            raise TypeError
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond the float range: not a number a setting can hold
                return math.inf if value > 0 else -math.inf
        raise TypeError
    if inner is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if inner is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise TypeError
    return value  # an annotation this module does not check (e.g. Any)


INT64_MAX = 2**63 - 1  # the largest size or index a torch tensor takes
# Lower bounds of what a setting makes a stage hold, true of every model and tokenizer here (see check_fits):
TOKEN_BYTES = 8  # a token id in a batch or a packed corpus (int64)
LOGIT_BYTES = 4 * 256  # one position's fp32 logits: a byte-level BPE vocabulary has at least its 256 byte tokens
ITEM_BYTES = 256  # a task problem, conversation or document held as Python objects (a task problem takes ~1 KiB)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


CPU_COUNT = _cpus()  # the CPUs this process may run on: the most intra-op threads that can run at once


def check_fields(obj: Any) -> None:
    """Type-check and range-check every field of a dataclass instance in place (conversions are written back).

    Raises ConfigError naming the first field that is wrong, its flag, the value and what was expected. Besides
    the option's min / max / choices: floats must be finite (unless the option opts in to ±inf) and ints must
    fit in 64 bits. Each check is written so that NaN fails it (`not lo <= x`), never passes it.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            value = coerce(value, hints[f.name])
        except TypeError:
            raise ConfigError(f"{describe(f)} = {value!r}: expected {_type_name(hints[f.name])}") from None
        object.__setattr__(obj, f.name, value)
        items = value if isinstance(value, (list, tuple)) else [value]
        lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
        for item in items:
            if item is None:
                continue
            if isinstance(item, float) and not (math.isfinite(item) or (f.metadata.get("infinite") and item == item)):
                raise ConfigError(f"{describe(f)} = {item!r}: must be a finite number")
            if isinstance(item, int) and not isinstance(item, bool) and not -INT64_MAX <= item <= INT64_MAX:
                raise ConfigError(f"{describe(f)} = {item!r}: must fit in 64 bits (at most {INT64_MAX:,} in size)")
            if choices is not None and item not in choices:
                raise ConfigError(f"{describe(f)} = {item!r}: expected one of {', '.join(map(str, choices))}")
            if lo is not None and not item >= lo:
                raise ConfigError(f"{describe(f)} = {item!r}: must be >= {lo}")
            if hi is not None and not item <= hi:
                raise ConfigError(f"{describe(f)} = {item!r}: must be <= {hi}")
            if f.metadata.get("check") is not None and (problem := f.metadata["check"](item)):
                raise ConfigError(f"{describe(f)} = {item!r}: {problem}")


DEVICE_KINDS = ("auto", "cpu", "cuda")  # what --device takes: one of these, or cuda:N


def device_syntax(spec: str) -> str | None:
    """None when `spec` is a --device value (`auto`, `cpu`, `cuda`, `cuda:N`), else what is wrong with it."""
    kind, colon, index = spec.partition(":")
    if spec in DEVICE_KINDS or (kind == "cuda" and colon and index.isdecimal() and index.isascii()):
        return None
    return "expected auto, cpu, cuda or cuda:N (N the GPU's index, e.g. cuda:0)"


def device_option() -> Any:
    """The one declaration of the `--device` field every computing stage has (`device: str = device_option()`):
    checked at construction for its form (`device_syntax`), and turned into a torch.device by `resolve_device`
    when the stage starts, which is where a device this machine lacks is refused (a configuration names a device
    without being on it: a saved run is read back on any machine)."""
    return option("auto", "where the model and its tensors live: auto (CUDA when torch.cuda.is_available(), else "
                  "the CPU), cpu, cuda or cuda:N", metavar="auto|cpu|cuda[:N]", check=device_syntax)


def resolve_device(spec: str) -> Any:
    """The torch.device a `--device` value names on this machine: `auto` is the current CUDA device when
    torch.cuda.is_available(), else the CPU; `cuda` / `cuda:N` without CUDA, or with N beyond the device count,
    is a ConfigError naming --device (one line), before any model is built."""
    import torch  # here, not at the top: options is the configs' layer and reads no tensors

    if (problem := device_syntax(spec)) is not None:
        raise ConfigError(f"device (--device) = {spec!r}: {problem}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device (--device) = {spec!r}: CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(spec.partition(":")[2]), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device (--device) = {spec!r}: this machine has {count} CUDA device"
                          f"{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", index)


def device_of(cfg: Any) -> Any:
    """`resolve_device(cfg.device)`: the torch.device a stage's configuration puts its model on. Looked up in this
    module at call time, so that a test can stand a device in for `resolve_device`."""
    return resolve_device(cfg.device)


def memory_bytes() -> int:
    """The machine's physical memory (RAM) in bytes: what no stage's working set can exceed.

    The ceiling of `check_fits`. Physical, not currently free, memory: a setting that needs more than the whole
    machine can never run, while free memory changes from minute to minute. NEMOTRON3_MEMORY_BYTES overrides it
    (a container whose limit is below the host's RAM, or a test)."""
    given = os.environ.get("NEMOTRON3_MEMORY_BYTES")
    if given:
        return int(given)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): no ceiling rather than a wrong one
        return INT64_MAX


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_fits(obj: Any, name: str, nbytes: int, what: str) -> None:
    """Refuse field `name` when `nbytes`, a lower bound of what it makes the stage hold (`what` says which
    tensors), exceeds `memory_bytes()`: such a setting would hang or die in the allocator later, so it is
    refused now, in one line, without allocating anything."""
    have = memory_bytes()
    if nbytes > have:
        fail(obj, name, f"{what} takes at least {_size(nbytes)}, more than this machine's {_size(have)} of memory")


def check_items(obj: Any, *names: str) -> None:
    """check_fits for fields that count task problems, conversations or documents held at once (ITEM_BYTES
    each at least)."""
    for name in names:
        n = getattr(obj, name)
        check_fits(obj, name, n * ITEM_BYTES, f"{n:,} problems, conversations or documents held at once")


def field_named(obj_or_cls: Any, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(obj_or_cls) if f.name == name)


def fail(obj_or_cls: Any, name: str, message: str) -> typing.NoReturn:
    """Raise ConfigError about field `name`: `name (--flag) = value: message`."""
    f = field_named(obj_or_cls, name)
    value = getattr(obj_or_cls, name, None) if not isinstance(obj_or_cls, type) else None
    raise ConfigError(f"{describe(f)} = {value!r}: {message}")


def to_dict(obj: Any) -> dict[str, Any]:
    """The JSON form of a config: paths as strings, tuples as lists, and first its stage (`"stage": "sft"`)
    when the class names one, so that a saved configuration says which command wrote it."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    stage = {"stage": obj.stage} if getattr(obj, "stage", "") else {}
    return {**stage, **{f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}


def _a(stage: str) -> str:
    """`a pretrain run`, `an sft run`, `an rl run`: short stage names are read letter by letter."""
    vowel_sound = stage[:1] in ("aefhilmnorsx" if len(stage) <= 3 else "aeiou")
    return f"{'an' if vowel_sound else 'a'} {stage}"


def _stage_of(data: dict[str, Any], cls: type) -> str | None:
    """The stage whose configuration `data` is: its `stage` key, or for a configuration saved before stages
    were recorded, `cls`'s stage when its fields hold every key of `data`, else the stage config class (among
    those imported) whose fields hold them all, the closest such class when several do."""
    if isinstance(data.get("stage"), str):
        return data["stage"]
    keys = set(data)
    fits = [c for c in (cls, *_subclasses(StageConfig)) if getattr(c, "stage", "")
            and keys <= {f.name for f in dataclasses.fields(c)}]
    return min(fits, key=lambda c: (c is not cls, len(dataclasses.fields(c)))).stage if fits else None


def check_stage(cls: type, data: dict[str, Any], where: Any) -> None:
    """Refuse a saved configuration `data` of another stage than `cls`'s: `DIR holds a pretrain run, not an sft
    run` (rather than the other stage's fields listed as unknown)."""
    ours, theirs = getattr(cls, "stage", ""), _stage_of(data, cls)
    if ours and theirs is not None and theirs != ours:
        raise ConfigError(f"{where} holds {_a(theirs)} run, not {_a(ours)} run: --resume continues a run of the "
                          f"same command; give `nemotron3 {ours}` an --out of its own")


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Rebuild `cls` from its JSON form; missing keys take defaults. Another stage's configuration is refused
    naming both stages; unknown keys (of no stage) are an error naming them."""
    where = where or cls.__name__
    check_stage(cls, data, where)
    data = {k: v for k, v in data.items() if k != "stage"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}")
    return cls(**data)


def restore_config(cfg: T, saved: dict[str, Any], where: Any, operational: typing.Collection[str]) -> T:
    """The configuration a resumed run continues with: the saved run's (`saved`, its JSON form), plus the caller's
    `operational` fields (those that only decide what is saved, logged or reported) where the caller set them.

    A field outside `operational` that the caller set (to something other than its default) and that differs
    from the saved value is refused with ConfigError: it would change what the run computes, so the result
    would match neither run.
    """
    cls = type(cfg)
    check_stage(cls, saved, where)
    defaults = cls()
    restored = from_dict(cls, {**saved, "out": cfg.out, "resume": True}, where=f"{where} (saved run)")
    changed = [f.name for f in dataclasses.fields(cfg) if f.name not in operational
               and getattr(cfg, f.name) != getattr(defaults, f.name)
               and getattr(cfg, f.name) != getattr(restored, f.name)]
    if changed:
        diffs = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)!r} (saved: {getattr(restored, n)!r})"
                          for n in changed)
        raise ConfigError(f"--resume continues the run saved in {where} with its own configuration; {diffs} would "
                          "change what the run computes. Drop these flags, or start a new run in another --out.")
    return dataclasses.replace(restored, **{n: getattr(cfg, n) for n in operational
                                            if getattr(cfg, n) != getattr(defaults, n)})


@dataclasses.dataclass
class StageConfig:
    """Base of the stage configs: `__post_init__` runs `check_fields` and then the stage's own `validate()`.

    `stage` (a class attribute, not a field) is the command a subclass configures; `to_dict` records it.
    """

    stage = ""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses extend it (and call super().validate())."""
