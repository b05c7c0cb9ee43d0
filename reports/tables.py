"""Generic result tables: per-run rows -> mean ± std per group -> Markdown or LaTeX (booktabs).

A table generator (one module per paper table) filters the results frame, calls `summarize`
and `format_table`, and registers itself in `TABLES` with the study it reads::

    @TABLES.register("reward_conflict", study="reward-conflict", paper="Table 5")
    def write_reward_conflict_tables(df, out_dir) -> dict[str, Path]: ...

Highlighting follows the paper's convention: per metric the best row is bold and the second
best underlined (LaTeX) or italic (Markdown; ``second_mark="underline"`` writes ``<u>…</u>``).
Rows are ranked on the values *as displayed* (rounded to the metric's digits), so rows that read
the same share a mark; a missing value ("–") is never ranked.
"""

from __future__ import annotations

import importlib
import math
import numbers
import pkgutil
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

import reports
from tvkd.paths import atomic_write_text
from tvkd.registry import Registry

__all__ = ["MISSING", "TABLES", "MetricSpec", "discover", "format_seeds", "format_table", "latex_escape", "seeds_of",
           "summarize", "write_table_files"]

#: Table generators: name -> callable(df, out_dir) -> {format: Path}; metadata: study, paper, outputs.
TABLES: Registry = Registry("table")

#: What a cell shows when it has no value (Markdown; LaTeX writes ``--``, the same dash).
MISSING = "–"


@dataclass(frozen=True)
class MetricSpec:
    """How one metric is shown: header label, ranking direction, decimals, and whether the stored
    fraction is shown as a percentage (×100; say "(%)" in the label)."""

    label: str
    higher_is_better: bool = True
    digits: int = 2
    percent: bool = False


def seeds_of(values: Iterable[object]) -> list[object]:
    """The distinct seeds among ``values`` (a frame's ``seed`` column), NaN left out, whole numbers as ints,
    sorted with the numbers first."""
    seeds = []
    for s in pd.unique(pd.Series(list(values), dtype=object)):
        if isinstance(s, numbers.Real) and not isinstance(s, bool):
            if math.isnan(s):
                continue
            s = int(s) if float(s).is_integer() else float(s)
        if s not in seeds:
            seeds.append(s)
    return sorted(seeds, key=lambda s: (0, s, "") if isinstance(s, (int, float)) else (1, 0, str(s)))


def format_seeds(values: Iterable[object]) -> str:
    """`seeds_of` as a caption reads them: "0, 1, 2", or "(none)"."""
    return ", ".join(map(str, seeds_of(values))) or "(none)"


def summarize(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and count per group, in order of first appearance.

    Columns: ``by``…, ``n`` (runs in the group), and per metric ``<m>.mean``, ``<m>.std``,
    ``<m>.n`` (runs with a value: NaN is skipped, not counted). One value gives std 0 — shown as
    "± 0.00", so a single seed is visible as such; no value gives NaN mean and std.
    """
    by, metrics = list(by), list(metrics)
    missing = [c for c in by + metrics if c not in df.columns]
    if missing:
        raise KeyError(f"summarize: columns {missing} are not in the frame; it has {list(df.columns)}")
    rows = []
    if len(df):
        for key, group in df.groupby(by, dropna=False, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            row: dict[str, object] = dict(zip(by, key))
            row["n"] = len(group)
            for m in metrics:
                try:
                    values = group[m].astype("float64").dropna()
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"summarize: metric column {m!r} holds non-numeric values ({exc})") from None
                n = len(values)
                row[f"{m}.mean"] = float(values.mean()) if n else math.nan
                row[f"{m}.std"] = float(values.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan)
                row[f"{m}.n"] = n
            rows.append(row)
    columns = by + ["n"] + [f"{m}.{s}" for m in metrics for s in ("mean", "std", "n")]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

_LATEX_CHARS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    # Unicode that pdflatex cannot set in text mode: write it as the math it stands for.
    "–": "--", "—": "---", "±": r"$\pm$", "×": r"$\times$", "−": "$-$", "≤": r"$\leq$", "≥": r"$\geq$",
    "↑": r"$\uparrow$", "↓": r"$\downarrow$", "α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$",
    "π": r"$\pi$", "Σ": r"$\Sigma$", "Φ": r"$\Phi$", "ψ": r"$\psi$", "Ψ": r"$\Psi$", "Δ": r"$\Delta$",
}


def latex_escape(text: str) -> str:
    """Text safe for a LaTeX table cell (special characters escaped, Greek and ± as math)."""
    return "".join(_LATEX_CHARS.get(ch, ch) for ch in str(text))


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def _number(value: float, spec: MetricSpec) -> str:
    text = f"{value * (100 if spec.percent else 1):.{spec.digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _marks(shown: list[float | None], ranked: Sequence[bool], higher_is_better: bool) -> list[int]:
    """Per row: 1 best, 2 second best, 0 unmarked. Needs at least two ranked rows with a value."""
    candidates = [v for v, r in zip(shown, ranked) if r and v is not None]
    if len(candidates) < 2:
        return [0] * len(shown)
    order = sorted(set(candidates), reverse=higher_is_better)
    best = order[0]
    second = order[1] if len(order) > 1 else None
    return [0 if (v is None or not r) else 1 if v == best else 2 if v == second else 0
            for v, r in zip(shown, ranked)]


def format_table(
    summary: pd.DataFrame,
    *,
    metrics: Mapping[str, MetricSpec],
    row_label_cols: Sequence[str] | Mapping[str, str],
    fmt: Literal["markdown", "latex"] = "markdown",
    highlight: bool = True,
    ranked: Sequence[bool] | Mapping[str, Sequence[bool]] | None = None,
    n_col: str | None = "n",
    latex_cols: Collection[str] = (),
    arrows: bool = True,
    caption: str | None = None,
    label: str | None = None,
    rules_before: Collection[int] = (),
    second_mark: Literal["italic", "underline"] = "italic",
    extra_cols: Sequence[str] | Mapping[str, str] = (),
) -> str:
    """Render a `summarize` frame as a Markdown or booktabs LaTeX table; returns the text.

    - ``row_label_cols``: the label columns, left to right (a mapping gives their headers).
    - ``metrics``: metric name -> `MetricSpec`, in column order; cells read "mean ± std", with
      " (n=k)" added when fewer runs than the row's ``n`` have that metric, and "–" without a value.
    - ``highlight``: best per metric bold, second underlined (LaTeX) / italic (Markdown); only rows
      whose ``ranked`` flag is true compete (default all; e.g. leave negative controls out). A
      mapping gives flags per metric (a metric it does not name ranks every row).
    - ``n_col``: header of a last column with the runs per row (None to omit).
    - ``latex_cols``: label columns that already hold LaTeX (e.g. formulas); others are escaped.
    - ``arrows``: add ↑/↓ to metric headers. ``caption``/``label``: LaTeX wraps the tabular in a
      ``table`` float with them; Markdown puts the caption below the table.
    - ``rules_before``: row positions that get a ``\\midrule`` above them (LaTeX only).
    - ``second_mark``: how Markdown marks the second best: ``_italic_`` (default) or ``<u>underline</u>``,
      as the paper does (LaTeX always underlines).
    - ``extra_cols``: columns of ``summary`` holding pre-formatted text (e.g. effect sizes), shown after
      the metrics and before ``n`` (a mapping gives their headers); never ranked or marked, missing
      values read "–", escaped unless named in ``latex_cols``.
    """
    if fmt not in ("markdown", "latex"):
        raise ValueError(f"fmt must be 'markdown' or 'latex', got {fmt!r}")
    if second_mark not in ("italic", "underline"):
        raise ValueError(f"second_mark must be 'italic' or 'underline', got {second_mark!r}")
    labels = dict(row_label_cols) if isinstance(row_label_cols, Mapping) else {c: c for c in row_label_cols}
    extras = dict(extra_cols) if isinstance(extra_cols, Mapping) else {c: c for c in extra_cols}
    needed = list(labels) + list(extras) + [f"{m}.{s}" for m in metrics for s in ("mean", "std", "n")]
    needed += ["n"] if n_col is not None else []
    absent = [c for c in needed if c not in summary.columns]
    if absent:
        raise KeyError(f"format_table: columns {absent} are missing; pass a summarize() frame")
    unknown = [m for m in ranked if m not in metrics] if isinstance(ranked, Mapping) else []
    if unknown:
        raise KeyError(f"format_table: ranked names metrics {unknown} that the table does not show")
    flags: dict[str, list[bool]] = {}
    for m in metrics:
        chosen = ranked.get(m) if isinstance(ranked, Mapping) else ranked
        flags[m] = [True] * len(summary) if chosen is None else [bool(f) for f in chosen]
        if len(flags[m]) != len(summary):
            raise ValueError(f"ranked has {len(flags[m])} flags for {len(summary)} rows (metric {m!r})")
    latex = fmt == "latex"
    records = summary.to_dict("records")

    def text(value: object, raw: bool = False) -> str:
        if _is_missing(value):
            return "--" if latex else MISSING
        if latex:
            return str(value) if raw else latex_escape(str(value))
        return _markdown_escape(str(value))

    header = [text(h) for h in labels.values()]
    for spec in metrics.values():
        arrow = (" ↑" if spec.higher_is_better else " ↓") if arrows else ""
        header.append(text(spec.label + arrow))
    header += [text(h) for h in extras.values()]
    if n_col is not None:
        header.append(f"${n_col}$" if latex and n_col == "n" else text(n_col))

    body = [[text(r[c], raw=c in latex_cols) for c in labels] for r in records]
    for m, spec in metrics.items():
        shown = [None if _is_missing(r[f"{m}.mean"]) or not r[f"{m}.n"] else float(_number(r[f"{m}.mean"], spec))
                 for r in records]
        marks = _marks(shown, flags[m], spec.higher_is_better) if highlight else [0] * len(records)
        for cells, r, v, mark in zip(body, records, shown, marks):
            if v is None:
                cells.append("--" if latex else MISSING)
                continue
            pm = r"$\pm$" if latex else "±"
            cell = f"{_number(r[f'{m}.mean'], spec)} {pm} {_number(r[f'{m}.std'], spec)}"
            if n_col is not None and int(r[f"{m}.n"]) != int(r["n"]):
                cell += f" (n={int(r[f'{m}.n'])})"
            if mark == 1:
                cell = rf"\textbf{{{cell}}}" if latex else f"**{cell}**"
            elif mark == 2:
                cell = (rf"\underline{{{cell}}}" if latex else f"<u>{cell}</u>" if second_mark == "underline"
                        else f"_{cell}_")
            cells.append(cell)
    for c in extras:
        for cells, r in zip(body, records):
            cells.append(text(r[c], raw=c in latex_cols))
    if n_col is not None:
        for cells, r in zip(body, records):
            cells.append(str(int(r["n"])))

    n_labels = len(labels)
    if latex:
        return _latex(header, body, n_labels, caption, label, set(rules_before))
    return _markdown(header, body, n_labels, caption)


def _markdown(header: list[str], body: list[list[str]], n_labels: int, caption: str | None) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    widths = [max(w, 3) for w in widths]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    align = ["-" * (w - 1) + ":" if i >= n_labels else ":" + "-" * (w - 1) for i, w in enumerate(widths)]
    lines = [line(header), "|" + "|".join(f" {a} " for a in align) + "|", *(line(r) for r in body)]
    if caption:
        lines += ["", _markdown_escape(caption)]
    return "\n".join(lines) + "\n"


def _latex(header: list[str], body: list[list[str]], n_labels: int, caption: str | None,
           label: str | None, rules_before: set[int]) -> str:
    colspec = "l" * n_labels + "r" * (len(header) - n_labels)
    lines = [rf"\begin{{tabular}}{{{colspec}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for i, row in enumerate(body):
        if i in rules_before and i > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption is not None or label is not None:
        head = [r"\begin{table}[t]", r"\centering"]
        if caption is not None:
            head.append(rf"\caption{{{latex_escape(caption)}}}")
        if label is not None:
            head.append(rf"\label{{{label}}}")
        lines = head + lines + [r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table_files(out_dir: str | Path, stem: str, source: str, render: Callable[[str], str]) -> dict[str, Path]:
    """``<stem>.md`` and ``<stem>.tex`` in ``out_dir`` (atomically): ``render("markdown")`` and ``render("latex")``
    under a first line naming the generator (``source``); returns ``{"md": path, "tex": path}``."""
    out = Path(out_dir)
    paths = {"md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    atomic_write_text(paths["md"], f"<!-- Generated by {source} from the results store; do not edit by hand. -->\n\n"
                      + render("markdown"))
    atomic_write_text(paths["tex"], f"% Generated by {source} from the results store; do not edit by hand.\n"
                      + render("latex"))
    return paths


def discover() -> Registry:
    """Import every module of the ``reports`` package so that their generators register; returns `TABLES`."""
    for module in pkgutil.iter_modules(reports.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"reports.{module.name}")
    return TABLES
