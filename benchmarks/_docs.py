"""Writes a benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``; a missing section is appended under its heading, a
missing page is created with the intro below. Other sections are untouched.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"

INTRO = """# Benchmarks

Benchmarks are plain scripts in `benchmarks/`, not part of the test run. Each
writes its own inputs from a seeded generator, runs the command under test
several times in fresh processes and reports the **median**; where a baseline
makes a number meaningful (hashing the same bytes, starting the interpreter)
it is measured in the same run and shown as a ratio. Each table names the
command that produced it and the machine it ran on; numbers from different
machines are not comparable.
"""


def write_section(name: str, heading: str, section: str) -> Path:
    """Replace benchmark ``name``'s section of docs/benchmarks.md with ``section``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOCS.read_text() if DOCS.exists() else INTRO
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{heading}\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(head + start + "\n" + section.strip() + "\n" + end + tail)
    return DOCS
