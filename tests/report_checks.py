"""Checks shared by the report generators' tests: a table's cells read back and compared with an
independent computation from the fixture rows."""

from __future__ import annotations

import statistics


def assert_cell(cell: str, values: list[float], digits: int) -> None:
    """A "mean ± std" cell equals the sample mean and std of ``values``, to the cell's rounding."""
    mean, std = (float(x) for x in cell.split(" ± "))
    tolerance = 0.5 * 10 ** -digits + 1e-9
    assert abs(mean - statistics.mean(values)) <= tolerance and abs(std - statistics.stdev(values)) <= tolerance, \
        (cell, statistics.mean(values), statistics.stdev(values))


def markdown_rows(text: str) -> list[list[str]]:
    """The body cells of a Markdown table, marks (bold, italic) removed."""
    lines = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [[c.strip().strip("*").strip("_") for c in line.strip("|").split(" | ")] for line in lines]


def load_study(name: str) -> dict:
    """A registered study's YAML as parsed (not checked)."""
    from studies.spec import read_study

    return read_study(name)[0]


def expand_study(spec, *, seeds=None, quick=False, profile=None) -> list:
    """[(run info, run config)] of every run of a study (a name, a path, a mapping or a StudyFile), in run order."""
    from studies.spec import load_spec

    return [(r.info, r.config) for r in load_spec(spec, profile).runs(seeds=seeds, quick=quick)]
