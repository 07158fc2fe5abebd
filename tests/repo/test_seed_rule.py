"""One seed-derivation rule (issue 29): `options.derive_seed` is the only place that writes `seed * 1_000_003`;
RL's task prompts and the NVFP4 conversion's per-layer stochastic-rounding seeds derive theirs through it."""

from __future__ import annotations

import zlib
from pathlib import Path

from nemotron3 import tasks
from nemotron3.options import derive_seed
from nemotron3.quant import convert
from nemotron3.rl.prompts import TaskPrompts

PACKAGE = Path(__file__).resolve().parents[2] / "nemotron3"


def test_the_rule_is_written_once():
    found = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "1_000_003" in p.read_text()}
    assert found == {"options.py"}


def test_the_rule_and_its_users():
    assert derive_seed(5, 7) == 5 * 1_000_003 + 7 and derive_seed(2**62, 0) == (2**62 * 1_000_003) % (2**63 - 1)
    rows = TaskPrompts(seed=3).batch(11, 4)
    want = tasks.mixture(4, seed=derive_seed(3, 11), split="train", difficulty=1, families=None)
    assert [r.messages[0]["content"] for r in rows] == [p.prompt for p in want]
    name = "backbone.layers.0.mixer.in_proj"
    assert convert._seed(9, name) == derive_seed(9, zlib.crc32(name.encode()))
