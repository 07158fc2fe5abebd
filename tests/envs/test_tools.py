"""Tools (envs/tools.py): JSON schemas equal transformers' `get_json_schema` on the same functions; a call's
failures (raises, hangs, returns a non-string, bad arguments) each become their documented message, never a crash."""

from __future__ import annotations

import enum
import time
from typing import Literal

import pytest
from transformers.utils import get_json_schema as hf_schema

from nemotron3.envs.tools import TOOL_ERRORS, call_tool, check_arguments, get_json_schema, tool_error


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


def lookup(key: str):
    """Look up the number stored under a name.

    Args:
        key: the name, e.g. p4
    """


def scale(x: float, factor: int = 2, unit: str | None = None, tags: list[str] | None = None) -> float:
    """Multiply a number.

    Longer explanation that is part of the description.

    Args:
        x: the number to scale, which may take
            two lines to describe
        factor: by how much
        unit: an optional unit (choices: ["m", "s"])
        tags: labels

    Returns:
        The scaled number.
    """


def paint(colour: Colour, mode: Literal["fast", "slow"], sizes: dict[str, int], pair: tuple[int, str],
          flag: bool = False, anything: int | str = 0):
    """Paint something.

    Args:
        colour: which colour
        mode: how
        sizes: sizes by name
        pair: a number and a word
        flag: a switch
        anything: a number or a word
    """


class Box:
    def put(self, item: str, count: int = 1) -> None:
        """Put items in the box.

        Args:
            item: what to put
            count: how many
        """


@pytest.mark.parametrize("fn", [lookup, scale, paint, Box().put], ids=lambda f: f.__name__)
def test_schema_equals_transformers(fn):
    assert get_json_schema(fn) == hf_schema(fn)


def test_schema_errors_name_the_function_and_argument():
    def no_doc(x: int):
        pass

    def no_hint(x):
        """Doc.

        Args:
            x: a thing
        """

    def undescribed(x: int, y: int):
        """Doc.

        Args:
            x: a thing
        """

    def custom(x: Box):
        """Doc.

        Args:
            x: a box
        """

    for fn, words in [(no_doc, "no docstring"), (no_hint, "x has no type hint"), (undescribed, "'y'"),
                      (custom, "type hint")]:
        with pytest.raises(ValueError, match=words) as e:
            get_json_schema(fn)
        assert fn.__name__ in str(e.value) or fn is custom


def test_check_arguments():
    s = get_json_schema(scale)
    assert check_arguments(scale, s, {"x": 2}) is None
    assert check_arguments(scale, s, {"x": 2.5, "factor": 3, "unit": "m", "tags": ["a"]}) is None
    assert "missing a required argument: 'x'" in check_arguments(scale, s, {"factor": 2})
    assert "unexpected keyword argument 'y'" in check_arguments(scale, s, {"x": 1, "y": 2})
    assert "'factor' must be integer, got number 2.5" in check_arguments(scale, s, {"x": 1, "factor": 2.5})
    assert "'factor' must be integer, got boolean" in check_arguments(scale, s, {"x": 1, "factor": True})
    assert "'unit'" in check_arguments(scale, s, {"x": 1, "unit": "kg"})  # not one of the choices
    assert check_arguments(scale, s, {"x": 1, "unit": None}) is None  # nullable
    assert "'x' must be number, got string" in check_arguments(scale, s, {"x": "1"})
    assert check_arguments(scale, s, [1]) == "arguments must be an object, got array"


def test_call_failures_become_documented_messages():
    def ok(x: int) -> str:
        return str(x + 1)

    def boom(x: int) -> str:
        raise KeyError(f"no {x}")

    def hang(x: int) -> str:
        time.sleep(2)
        return "late"

    def number(x: int) -> int:
        return x

    assert call_tool(ok, {"x": 1}).content == "2" and call_tool(ok, {"x": 1}).error is None
    r = call_tool(boom, {"x": 3})
    assert (r.error, r.content) == ("exception", "error: boom raised KeyError: 'no 3'")
    t0 = time.perf_counter()
    r = call_tool(hang, {"x": 0}, timeout=0.05)
    assert time.perf_counter() - t0 < 1.0  # the limit, not the tool, decided
    assert (r.error, r.content) == ("timeout", "error: hang did not finish within 0.05 s")
    r = call_tool(number, {"x": 5})
    assert (r.error, r.content) == ("non_string", "error: number returned int, not a string")
    assert {tool_error(k, "f", "d").error for k in TOOL_ERRORS} == set(TOOL_ERRORS)
