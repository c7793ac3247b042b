"""The README's digits tables are the benchmark's own: each row the README shows for a teacher kind is
the row of that kind's table in assets/benchmarks/ (the file tools/benchmark.py writes), character for
character, and the README shows every row the file has (in any order). A re-measured preset, or one
whose row the tool dropped because the preset changed, cannot leave an old number in the README."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| objective | steps | FID (Inception) |"
KINDS = {0: "digits.md", 1: "digits_edm.md", 2: "digits_flow.md"}  # the README's tables, in order


def tables(text: str) -> list[list[str]]:
    """The body rows of each digits results table (the lines after its header and rule)."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith(HEADER):
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(lines[j].strip())
                j += 1
            out.append(rows)
    return out


@pytest.mark.parametrize("index,asset", sorted(KINDS.items()))
def test_readme_rows_are_the_benchmark_files_rows(index, asset):
    readme = tables((ROOT / "README.md").read_text())
    measured = tables((ROOT / "assets" / "benchmarks" / asset).read_text())
    assert len(readme) == len(KINDS) and len(measured) == 1
    shown, written = readme[index], measured[0]
    assert sorted(shown) == sorted(written), (
        f"README table {index + 1} and assets/benchmarks/{asset} differ: only in the README "
        f"{sorted(set(shown) - set(written))}, only in the file {sorted(set(written) - set(shown))}")
