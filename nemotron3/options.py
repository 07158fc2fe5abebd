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
of its option. `from_dict` rebuilds a config from its JSON form (what `--resume` reads back).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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
) -> Any:
    """A dataclass field with what the CLI and the checks need.

    default: the value (lists are copied per instance); omit it for a required field. min / max: inclusive
    bounds of a number (or of each element of a list). choices: allowed values (of each element of a list).
    positional: a positional argument instead of a flag. parse: turns the flag's one string into the field's
    value (e.g. `"1,2,3"` -> [1, 2, 3]); its errors reach the user as they are.
    """
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices is not None else None,
            "positional": positional, "metavar": metavar, "parse": parse}
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
            return float(value)
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


def check_fields(obj: Any) -> None:
    """Type-check and range-check every field of a dataclass instance in place (conversions are written back).

    Raises ConfigError naming the first field that is wrong, its flag, the value and what was expected.
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
            if choices is not None and item not in choices:
                raise ConfigError(f"{describe(f)} = {item!r}: expected one of {', '.join(map(str, choices))}")
            if lo is not None and item < lo:
                raise ConfigError(f"{describe(f)} = {item!r}: must be >= {lo}")
            if hi is not None and item > hi:
                raise ConfigError(f"{describe(f)} = {item!r}: must be <= {hi}")


def field_named(obj_or_cls: Any, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(obj_or_cls) if f.name == name)


def fail(obj_or_cls: Any, name: str, message: str) -> typing.NoReturn:
    """Raise ConfigError about field `name`: `name (--flag) = value: message`."""
    f = field_named(obj_or_cls, name)
    value = getattr(obj_or_cls, name, None) if not isinstance(obj_or_cls, type) else None
    raise ConfigError(f"{describe(f)} = {value!r}: {message}")


def to_dict(obj: Any) -> dict[str, Any]:
    """The JSON form of a config: paths as strings, tuples as lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Rebuild `cls` from its JSON form; unknown keys are an error naming them, missing keys take defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown fields {unknown}")
    return cls(**data)


def restore_config(cfg: T, saved: dict[str, Any], where: Any, operational: typing.Collection[str]) -> T:
    """The configuration a resumed run continues with: the saved run's (`saved`, its JSON form), plus the caller's
    `operational` fields (those that only decide what is saved, logged or reported) where the caller set them.

    A field outside `operational` that the caller set (to something other than its default) and that differs
    from the saved value is refused with ConfigError: it would change what the run computes, so the result
    would match neither run.
    """
    cls = type(cfg)
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
    """Base of the stage configs: `__post_init__` runs `check_fields` and then the stage's own `validate()`."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses extend it (and call super().validate())."""
