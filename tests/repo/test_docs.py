"""The repository is self-contained: every `docs/…` reference in code, tests, benchmarks and the README names a
file (and a § heading) that exists, and nothing points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("nemotron3/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
                  ROOT / "README.md", *ROOT.glob("docs/*.md")])
REFERENCE = re.compile(r"docs/([a-z0-9_-]+\.md)(?:\s+§(\d+)(?:\s*[-–]\s*§?(\d+))?)?")
# research notes that live outside the repository; a user who clones it does not have them
NOTES = r"(?:ARCHITECTURE|LOWPREC|POSTTRAIN|ANCHORS|STYLE_ANCHORS|DESIGN)"
OUTSIDE = re.compile(rf"\.\./shared\b|\bshared[/\\](?:docs|bench)|\b{NOTES}(?:\.md)?\s*§|\b{NOTES}\.md")


def references(text: str) -> list[tuple[str, list[int]]]:
    out = []
    for m in REFERENCE.finditer(text):
        first = int(m[2]) if m[2] else None
        last = int(m[3]) if m[3] else first
        out.append((m[1], list(range(first, last + 1)) if first is not None else []))
    return out


def headings(doc: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^## §(\d+)\b", doc.read_text(), flags=re.M)}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_references_resolve(path):
    if path.name == "test_docs.py":
        return
    text = path.read_text()
    for name, sections in references(text):
        doc = ROOT / "docs" / name
        assert doc.is_file(), f"{path.relative_to(ROOT)} cites docs/{name}, which does not exist"
        missing = set(sections) - headings(doc)
        assert not missing, f"{path.relative_to(ROOT)} cites docs/{name} §{sorted(missing)}, not a heading there"
    outside = OUTSIDE.findall(text)
    assert not outside, f"{path.relative_to(ROOT)} points outside the repository: {outside}"


def test_the_checks_see_what_they_look_for():
    assert references("see docs/inference.md §5 and docs/architecture.md §4-5") == [
        ("inference.md", [5]), ("architecture.md", [4, 5])]
    assert OUTSIDE.findall("(ARCHITECTURE.md §2)") and OUTSIDE.findall("../" + "shared" + "/bench/t9_config.json")
    assert not OUTSIDE.findall("docs/architecture.md §2, benchmarks/t9_config.json")
