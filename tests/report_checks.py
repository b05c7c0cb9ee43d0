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
