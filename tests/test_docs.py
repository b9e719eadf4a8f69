"""Every reference to docs/method.md in the repository points at a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SEARCHED = ("src", "tests", "configs", "scripts", "docs", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg"}

# "docs/method.md", optionally followed by "§7", "section 9", "sections 1-6", "sections 2-4 and 6",
# "§2-§4" or "§1, §3"; a reference may be wrapped across lines (and comment markers).
NUMBER = r"§?\s*\d+"
SPAN = rf"{NUMBER}(?:\s*[-–]\s*{NUMBER})?"
REFERENCE = re.compile(
    rf"docs/method\.md(?:\s*(?:§\s*|sections?\s+)(?P<spans>{SPAN}(?:\s*(?:,|and)\s*{SPAN})*))?", re.IGNORECASE
)


def cited_sections(text: str) -> list[set[int]]:
    """The section numbers of each ``docs/method.md`` reference in ``text`` (empty set: the page itself)."""
    # Join wrapped lines: a reference may continue on the next line of a comment or docstring.
    joined = re.sub(r"\s*\n\s*(?:#+\s*)?", " ", text)
    references = []
    for match in REFERENCE.finditer(joined):
        numbers: set[int] = set()
        for span in re.split(r"\s*(?:,|and)\s*", match.group("spans") or ""):
            bounds = [int(n) for n in re.findall(r"\d+", span)]
            if bounds:
                numbers.update(range(bounds[0], bounds[-1] + 1))
        references.append(numbers)
    return references


def headings(text: str) -> set[int]:
    """Numbers of the numbered headings (``## 9. Evaluation protocols``) of a Markdown page."""
    return {int(m.group(1)) for m in re.finditer(r"^#{1,6}\s+§?(\d+)\.?\s", text, re.MULTILINE)}


def referencing_files() -> list[Path]:
    files = []
    for name in SEARCHED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        files += [f for f in candidates if f.is_file() and f.suffix in SUFFIXES and f != METHOD]
    return files


def test_the_reference_parser_reads_every_form_used() -> None:
    text = (
        "(docs/method.md §7). docs/method.md section 11 and docs/method.md sections 1-6; "
        "(docs/method.md sections 2-4 and 6) §2-§4 docs/method.md §2-§4; see docs/method.md.\n"
        "# wrapped: (docs/method.md\n    # section 8), docs/method.md §1, §3"
    )
    assert cited_sections(text) == [{7}, {11}, set(range(1, 7)), {2, 3, 4, 6}, {2, 3, 4}, set(), {8}, {1, 3}]
    assert headings("# Title\n## 1. Stages\n### not 2 a number\n## 12. Departures\n## §3 IFA\n") == {1, 3, 12}


def test_every_method_reference_resolves() -> None:
    assert METHOD.is_file(), "docs/method.md is cited across the project and must exist"
    sections = headings(METHOD.read_text(encoding="utf-8"))
    assert set(range(1, 12)) <= sections, f"docs/method.md must keep sections 1-11, has {sorted(sections)}"
    found = 0
    for path in referencing_files():
        for numbers in cited_sections(path.read_text(encoding="utf-8", errors="replace")):
            found += 1
            missing = numbers - sections
            if missing:
                pytest.fail(f"{path.relative_to(ROOT)} cites docs/method.md §{sorted(missing)}, which has no heading")
    assert found >= 20  # the code, configs and docs cite the page about two dozen times
