"""The paper beside ours: each cell the paper has, its published value, ours, and how they compare.

``tvkd report --study <name> --compare-paper`` runs this after the tables. On the testbed (no
profile) the scales differ from the paper's, so it compares ranks and signs: per metric, the rank
of each row among the rows both tables have, Kendall's τ_b between the two orderings
(`scipy.stats.kendalltau`, with its p-value and n), and whether each row's difference to the
paper's baseline row has the same sign in both; a sentence says whether the paper's ordering
reproduces (τ > 0 and p < 0.05). With a profile (``--profile paper``: the paper's own setting) it
compares values: ours − paper.

The mapping contract. A table generator says how its rows and columns correspond to a paper
table with one or more `PaperMap`, found (first hit wins) in its registry metadata
(``@TABLES.register(..., paper_maps=(PaperMap(...),))``), in a ``PAPER_MAPS`` tuple of its module,
or registered here with `register_paper_maps` (how the reward-conflict and main tables declare
theirs, below)::

    PaperMap(
        name="table5",                       # names the output files (paper_table5.md / .png / .pdf)
        table="table5",                      # the paper CSV (reports/paper.py)
        row_column="name",                   # the CSV column naming the paper's rows
        column_column="metric",              # the CSV column naming its metrics
        where={},                            # fixed coordinates, e.g. {"dataset": "DPOMIX"}
        rows={"logits": "Logits", ...},      # our row key -> the paper's row name, in display order
        columns={"Margin Acc.": ("margin_accuracy",), "MT-bench": ("mt_bench/score", "oracle_score")},
                                             # paper metric -> our frame columns, the first one present used
        scale={"margin_accuracy": 100.0},    # ours x scale is in the paper's units (fractions -> %)
        row_key="label",                     # the frame column holding our row key (a run's study label)
        baseline="dpo",                      # our row key of the baseline for the sign comparison
        borrow={"dpo": {"MT-bench": ("table1", {"dataset": "DPOMIX", "method": "DPO", "metric": "MT"})}},
                                             # cells of a row taken from another paper table
        unranked=("teacher_dpo",),           # rows shown but left out of ranks and τ (references)
        lower_is_better=("KL",),             # paper metrics where lower is better
        by_sign=("KL",),                     # paper metrics compared only by each row's sign against the
                                             # baseline, through its paired 95% interval (no ranks, no τ)
        profiles=(None, "paper"),            # where it applies: None is the testbed; omitted: everywhere
        subject="aux rewards",               # for the sentence: "the paper's ordering of the six aux rewards"
        baseline_is_subject=False,           # the baseline is not one of them: "... and DPO"
    )

Our value of a cell is the mean over the study's runs (seeds) of that row and column; a row or
column that the store does not have is left out, and a map with no column of ours says so.

A metric in ``by_sign`` (Table 4's value KL: two students, where a rank order is a sign with no
interval) is compared only through each row's paired difference to the baseline and its 95% interval
(`reports.effects`: per item when the frame has per-item results, else a t-interval over the seeds):
the paper's sign is reproduced or contradicted only when the interval excludes 0, else "not shown".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reports.effects import EFFECT_METRICS, crossed_effect, effects_by_row, items_column
from reports.figures import save_figure
from reports.paper import PAPER_TABLES, load_table
from reports.tables import discover
from tvkd.paths import atomic_write_text

__all__ = ["Comparison", "MetricComparison", "PaperMap", "compare_study", "compare_to_paper", "format_comparison",
           "paper_maps_for", "register_paper_maps", "write_comparison"]

#: The p-value under which a positive τ counts as the paper's ordering reproduced.
ALPHA = 0.05
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


@dataclass(frozen=True)
class PaperMap:
    """How one of our tables maps onto a paper table (see the module docstring)."""

    name: str
    table: str
    row_column: str
    column_column: str
    rows: Mapping[str, str]
    columns: Mapping[str, tuple[str, ...]]
    where: Mapping[str, str] = field(default_factory=dict)
    scale: Mapping[str, float] = field(default_factory=dict)
    row_key: str = "label"
    rows_of: Callable[[pd.DataFrame], pd.Series] | None = None  # our row key per run, instead of `row_key`
    baseline: str | None = None
    borrow: Mapping[str, Mapping[str, tuple[str, Mapping[str, str]]]] = field(default_factory=dict)
    unranked: tuple[str, ...] = ()
    lower_is_better: tuple[str, ...] = ()
    by_sign: tuple[str, ...] = ()  # paper metrics compared only by sign against the baseline, through the interval
    profiles: tuple[str | None, ...] | None = None
    subject: str = "rows"
    baseline_is_subject: bool = False  # the baseline is one of the `subject` (DPO among the student methods)
    notes: Mapping[str, str] = field(default_factory=dict)  # paper metric -> a note printed beside its table

    def applies(self, profile: str | None) -> bool:
        return self.profiles is None or profile in self.profiles


_REGISTERED: dict[str, tuple[PaperMap, ...]] = {}


def register_paper_maps(generator: str, *maps: PaperMap) -> None:
    """Declare the paper maps of a table generator (by its `reports.tables.TABLES` name)."""
    _REGISTERED[generator] = tuple(maps)


def paper_maps_for(generator: str) -> tuple[PaperMap, ...]:
    """A generator's paper maps: its registry metadata ``paper_maps``, its module's ``PAPER_MAPS``, or
    those registered here; () when it declares none."""
    import sys

    tables = discover()
    meta = tables.meta(generator)
    if meta.get("paper_maps"):
        return tuple(meta["paper_maps"])
    module = sys.modules.get(getattr(tables.get(generator), "__module__", ""), None)
    if module is not None and getattr(module, "PAPER_MAPS", None):
        return tuple(module.PAPER_MAPS)
    return _REGISTERED.get(generator, ())


@dataclass
class MetricComparison:
    """One paper metric: the cells, the ranks, τ and the sign agreement."""

    paper_metric: str
    ours_column: str
    higher_is_better: bool
    cells: pd.DataFrame  # row, paper_row, paper, ours, uncertain, borrowed, paper_rank, ours_rank
    tau: float | None = None
    p_value: float | None = None
    n: int = 0
    signs_agree: int = 0
    signs_total: int = 0
    tau_needed: float | None = None  # the smallest |τ| with p < ALPHA at this n (None: none reaches it)
    signs_unresolved: int = 0  # rows whose paired interval against the baseline includes 0: not compared
    by_sign: bool = False  # compared only by each row's sign against the baseline (`PaperMap.by_sign`)
    #: per row compared with the baseline: row, paper_row, paper_diff, effect (an `Effect` or None), verdict
    #: ("reproduces" | "contradicted" | "not shown" | "no paired runs" | "no sign in the paper")
    sign_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Comparison:
    """A `PaperMap` applied to a study's frame."""

    map: PaperMap
    study: str
    profile: str | None
    seeds: int
    metrics: list[MetricComparison]
    absent: list[str]  # paper metrics with no column of ours


def _paper_cells(pmap: PaperMap) -> pd.DataFrame:
    """paper_row, metric, value, uncertain, source ('' or the table a borrowed cell comes from)."""
    t = load_table(pmap.table)
    for col, val in pmap.where.items():
        t = t[t[col] == val]
    out = pd.DataFrame({"paper_row": t[pmap.row_column], "metric": t[pmap.column_column], "value": t["value"],
                        "uncertain": t["uncertain"], "source": ""})
    extra = []
    for row, cells in pmap.borrow.items():
        for metric, (table, coords) in cells.items():
            other = load_table(table)
            for col, val in coords.items():
                other = other[other[col] == val]
            if len(other) != 1:
                raise ValueError(f"paper map {pmap.name}: {table} {dict(coords)} selects {len(other)} cells, not one")
            extra.append({"paper_row": pmap.rows[row], "metric": metric, "value": float(other["value"].item()),
                          "uncertain": bool(other["uncertain"].item()), "source": table})
    if extra:
        out = pd.concat([out, pd.DataFrame(extra)], ignore_index=True)
    return out


def _ours(frame: pd.DataFrame, pmap: PaperMap) -> pd.Series:
    keys = pmap.rows_of(frame) if pmap.rows_of is not None else frame.get(pmap.row_key)
    if keys is None:
        raise KeyError(f"paper map {pmap.name}: the frame has no {pmap.row_key!r} column to name its rows")
    return pd.Series([None if k is None or (isinstance(k, float) and math.isnan(k)) else str(k) for k in keys],
                     index=frame.index, dtype="object")


def _rank(values: pd.Series, higher_is_better: bool) -> pd.Series:
    return values.rank(method="min", ascending=not higher_is_better).astype("Int64")


def compare_to_paper(frame: pd.DataFrame, pmap: PaperMap, *, study: str = "", profile: str | None = None
                     ) -> Comparison:
    """Our frame beside the paper's table as `pmap` says; τ and signs over the rows both have."""
    from scipy.stats import kendalltau

    paper = _paper_cells(pmap)
    keys = _ours(frame, pmap)
    seeds = int(frame["seed"].nunique()) if "seed" in frame.columns and len(frame) else 0
    metrics, absent = [], []
    for paper_metric, candidates in pmap.columns.items():
        column = next((c for c in candidates if c in frame.columns and frame[c].notna().any()), None)
        if column is None:
            absent.append(f"{paper_metric} ({' or '.join(candidates)})")
            continue
        values = pd.to_numeric(frame[column], errors="coerce") * float(pmap.scale.get(column, 1.0))
        mean = values.groupby(keys).mean()
        rows = []
        for row, paper_row in pmap.rows.items():
            cell = paper[(paper["paper_row"] == paper_row) & (paper["metric"] == paper_metric)]
            ours = mean.get(row)
            if len(cell) != 1 or ours is None or math.isnan(ours) or math.isnan(float(cell["value"].iloc[0])):
                continue
            rows.append({"row": row, "paper_row": paper_row, "paper": float(cell["value"].iloc[0]),
                         "ours": float(ours), "uncertain": bool(cell["uncertain"].iloc[0]),
                         "borrowed": str(cell["source"].iloc[0])})
        cells = pd.DataFrame(rows, columns=["row", "paper_row", "paper", "ours", "uncertain", "borrowed"])
        higher = paper_metric not in pmap.lower_is_better
        ranked = ~cells["row"].isin(pmap.unranked)
        cells["paper_rank"] = pd.Series(pd.NA, index=cells.index, dtype="Int64")
        cells["ours_rank"] = pd.Series(pd.NA, index=cells.index, dtype="Int64")
        cells.loc[ranked, "paper_rank"] = _rank(cells.loc[ranked, "paper"], higher)
        cells.loc[ranked, "ours_rank"] = _rank(cells.loc[ranked, "ours"], higher)
        mc = MetricComparison(paper_metric, column, higher, cells, by_sign=paper_metric in pmap.by_sign)
        if mc.by_sign:  # no rank order: it would state a sign without its interval
            cells["paper_rank"] = pd.Series(pd.NA, index=cells.index, dtype="Int64")
            cells["ours_rank"] = pd.Series(pd.NA, index=cells.index, dtype="Int64")
        sub = cells[ranked]
        mc.n = len(sub)
        if mc.n >= 2 and not mc.by_sign:
            result = kendalltau(sub["paper"].to_numpy(), sub["ours"].to_numpy())
            tau, p = float(result.statistic), float(result.pvalue)
            mc.tau, mc.p_value = (None, None) if math.isnan(tau) else (tau, p)
        mc.tau_needed = minimal_tau(mc.n) if mc.n >= 2 and not mc.by_sign else None
        if pmap.baseline is not None and (cells["row"] == pmap.baseline).any():
            base = cells[cells["row"] == pmap.baseline].iloc[0]
            others = cells[(cells["row"] != pmap.baseline) & ranked]
            effects = _paired_effects(frame, keys, column, list(others["row"]), pmap.baseline)
            for (_, r), effect in zip(others.iterrows(), effects):
                paper_diff = r["paper"] - base["paper"]
                mc.sign_rows.append({"row": r["row"], "paper_row": r["paper_row"], "paper_diff": paper_diff,
                                     "effect": effect, "verdict": sign_verdict(paper_diff, effect)})
                # only a row whose paired interval against the baseline excludes 0 has a sign of ours
                if effect is None or not (effect.low > 0 or effect.high < 0):
                    mc.signs_unresolved += 1
                    continue
                mc.signs_total += 1
                mc.signs_agree += int(math.copysign(1, paper_diff) * (paper_diff != 0)
                                      == math.copysign(1, effect.estimate))
        metrics.append(mc)
    return Comparison(pmap, study, profile, seeds, metrics, absent)


def _paired_effects(frame: pd.DataFrame, keys: pd.Series, column: str, rows: list[str], baseline: str) -> list:
    """Per row, its paired effect against ``baseline`` in ``column`` (`reports.effects`): over the per-item
    results when the frame has them (the crossed seed × item interval), else over the per-seed values
    (a t-interval over the seeds); None without a paired seed."""
    if "seed" not in frame.columns:
        return [None] * len(rows)
    keyed = frame.assign(_paper_row=keys)
    if column in EFFECT_METRICS and items_column(column) in frame.columns:
        return effects_by_row(keyed, "_paper_row", rows, baseline, [column], table="compare")[column]
    values = pd.to_numeric(keyed[column], errors="coerce")
    by_seed = {k: dict(zip(part["seed"], values[part.index])) for k, part in keyed.groupby("_paper_row")}
    ref = {s: v for s, v in by_seed.get(baseline, {}).items() if not math.isnan(v)}
    out = []
    for row in rows:
        diffs = [[v - ref[s]] for s, v in by_seed.get(row, {}).items() if s in ref and not math.isnan(v)]
        out.append(crossed_effect(diffs) if diffs else None)
    return out


def sign_verdict(paper_diff: float, effect: Any) -> str:
    """Whether our paired difference (an `Effect` with its 95% interval, or None) shows the paper's sign of
    ``paper_diff``: "reproduces" or "contradicted" only when the interval excludes 0, else "not shown"."""
    if effect is None:
        return "no paired runs"
    if paper_diff == 0:
        return "no sign in the paper"
    if not (effect.low > 0 or effect.high < 0):
        return "not shown"
    return "reproduces" if (effect.estimate > 0) == (paper_diff > 0) else "contradicted"


def minimal_tau(n: int, alpha: float = ALPHA) -> float | None:
    """The smallest |τ| that Kendall's test (`scipy.stats.kendalltau`, two-sided, no ties) finds significant
    at ``alpha`` with ``n`` rows; None when even a perfect ordering is not (n ≤ 3)."""
    from scipy.stats import kendalltau

    pairs = n * (n - 1) // 2
    base = list(range(n))
    for discordant in range(pairs // 2 + 1):  # τ = 1 − 2·discordant/pairs, from 1 down to ~0
        order, left = [], discordant
        pool = list(base)
        for i in range(n):  # the permutation with exactly `discordant` inversions (a Lehmer code)
            step = min(left, n - 1 - i)
            order.append(pool.pop(step))
            left -= step
        if kendalltau(base, order).pvalue >= alpha:
            return None if discordant == 0 else 1 - 2 * (discordant - 1) / pairs
    return 0.0


def _count_words(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def _num(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def verdict(mc: MetricComparison, subject: str, where: str, baseline: str | None = None) -> str:
    """The plain sentence: does the paper's ordering reproduce? ``baseline``: the name of a ranked row that
    is not one of the ``subject`` (e.g. DPO among the aux rewards)."""
    if mc.tau is None:
        return (f"τ undefined (n = {mc.n}{', a tie in every row' if mc.n >= 2 else ''}): too few ranked rows to "
                f"compare the paper's ordering of the {subject} {where}")
    head = f"τ = {mc.tau:.2f} (n = {mc.n}, p = {mc.p_value:.2f})"
    others = mc.n - (baseline is not None)
    what = f"the paper's ordering of the {_count_words(others)} {subject}" + (f" and {baseline}" if baseline else "")
    if mc.p_value < ALPHA:
        return f"{head}: {what} {'reproduces' if mc.tau > 0 else 'is contradicted (τ < 0, p < ' + str(ALPHA) + ')'} {where}"
    needed = (f"at n = {mc.n} even τ = 1 gives p ≥ {ALPHA}" if mc.tau_needed is None
              else f"at n = {mc.n} a p < {ALPHA} needs |τ| ≥ {mc.tau_needed:.3f}")
    return f"{head}: {what} is not shown {where}, neither reproduced nor contradicted ({needed})"


_SIGN_WORDS = {
    "reproduces": "the paper's sign reproduces {where} (the 95% interval excludes 0)",
    "contradicted": "the paper's sign is contradicted {where} (the 95% interval excludes 0, on the other side)",
    "not shown": "the paper's sign is not shown {where}, neither reproduced nor contradicted (the 95% interval "
                 "includes 0)",
    "no paired runs": "no run of both rows on a common seed: not compared",
    "no sign in the paper": "the paper's two values are equal: no sign to compare",
}


def _effect_text(effect: Any, digits: int = 4) -> str:
    if effect is None:
        return "–"
    if math.isnan(effect.low) or math.isnan(effect.high):
        return f"{effect.estimate:+.{digits}f} [no interval: {effect.n_seeds} seed(s)]"
    return f"{effect.estimate:+.{digits}f} [{effect.low:+.{digits}f}, {effect.high:+.{digits}f}]"


def _sign_section(c: Comparison, mc: MetricComparison, where: str) -> list[str]:
    """A `PaperMap.by_sign` metric: per row the paper's value, ours, our paired difference to the baseline with
    its 95% interval, and whether the paper's sign is shown (no ranks: a rank order is a sign without an interval)."""
    base = c.map.rows[c.map.baseline] if c.map.baseline else ""
    verdicts = {r["row"]: r for r in mc.sign_rows}
    header = ["row", "paper", "ours", f"ours − {base} [95% CI]", "the paper's sign"]
    body = []
    for _, r in mc.cells.iterrows():
        sign = verdicts.get(r["row"])
        body.append([f"{r['paper_row']}{'*' if r['uncertain'] else ''}", _num(r["paper"]), f"{r['ours']:.4f}",
                     _effect_text(sign["effect"]) if sign else "–", sign["verdict"] if sign else "–"])
    widths = [max(len(x) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join(f" {':' + '-' * (w - 1) if i == 0 else '-' * (w - 1) + ':'} " for i, w in enumerate(widths))
             + "|"]
    lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |" for row in body]
    lines.append("")
    if not mc.sign_rows:
        lines.append(f"Not compared: no row beside {base} in both tables.")
    for r in mc.sign_rows:
        effect = r["effect"]
        paper_side = "below" if r["paper_diff"] < 0 else "above" if r["paper_diff"] > 0 else "equal to"
        seeds = f", paired over {effect.n_seeds} seed(s)" if effect is not None else ""
        lines.append(f"{r['paper_row']} − {base}: the paper's {mc.paper_metric} is {paper_side} {base}'s "
                     f"({r['paper_diff']:+.4g}); ours {_effect_text(effect)}{seeds}: "
                     + _SIGN_WORDS[r["verdict"]].format(where=where) + ".")
    return lines


def format_comparison(c: Comparison) -> str:
    """The comparison as Markdown: one table per metric, then τ, the sentence and the sign agreement."""
    pmap = c.map
    paper_name = PAPER_TABLES[pmap.table].paper
    where = "on the testbed" if c.profile is None else f"in the {c.profile} profile"
    fixed = ", ".join(f"{v}" for v in pmap.where.values())
    lines = [f"## {paper_name}{f' ({fixed})' if fixed else ''} beside {c.study} "
             f"({'testbed' if c.profile is None else 'profile ' + c.profile}, mean over {c.seeds} seed(s))", ""]
    lines.append("Ranks and signs are compared (the testbed's scales are not the paper's)." if c.profile is None
                 else "Values are compared: Δ = ours − paper.")
    notes = []
    for mc in c.metrics:
        cells = mc.cells
        scale = pmap.scale.get(mc.ours_column, 1.0)
        ours_label = mc.ours_column + (f" ×{scale:g}" if scale != 1 else "")
        arrow = "↑" if mc.higher_is_better else "↓"
        lines += ["", f"### {mc.paper_metric} {arrow} (paper) / {ours_label} (ours)", ""]
        if mc.by_sign:
            lines += _sign_section(c, mc, where)
            if mc.paper_metric in pmap.notes:
                lines.append(f"Note on the paper's {mc.paper_metric}: {pmap.notes[mc.paper_metric]}")
            continue
        if c.profile is None:
            header = ["row", "paper", "ours", "paper rank", "our rank", "Δ rank"]
        else:
            header = ["row", "paper", "ours", "Δ (ours − paper)", "paper rank", "our rank"]
        body = []
        for _, r in cells.iterrows():
            mark = ""
            if r["uncertain"]:
                mark += "*"
            if r["borrowed"]:
                mark += "†"
                notes.append(f"† {r['paper_row']}'s {mc.paper_metric} is from the paper's "
                             f"{PAPER_TABLES[r['borrowed']].paper}.")
            pr = "–" if pd.isna(r["paper_rank"]) else str(int(r["paper_rank"]))
            orank = "–" if pd.isna(r["ours_rank"]) else str(int(r["ours_rank"]))
            name = f"{r['paper_row']}{mark}"
            if c.profile is None:
                drank = "–" if pr == "–" else f"{int(r['ours_rank']) - int(r['paper_rank']):+d}"
                body.append([name, _num(r["paper"]), _num(r["ours"]), pr, orank, drank])
            else:
                body.append([name, _num(r["paper"]), _num(r["ours"]), f"{r['ours'] - r['paper']:+.3f}", pr, orank])
            if r["uncertain"]:
                notes.append(f"* {r['paper_row']} {mc.paper_metric}: uncertain in the transcription "
                             "(reports/paper_data/NOTES.md).")
        widths = [max(len(x) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
        lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
        rules = [":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
        lines.append("|" + "|".join(f" {r} " for r in rules) + "|")
        lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |" for row in body]
        ranked_rows = set(cells.loc[cells["paper_rank"].notna(), "row"])
        base_name = (pmap.rows[pmap.baseline] if pmap.baseline in ranked_rows and not pmap.baseline_is_subject
                     else None)
        lines += ["", verdict(mc, pmap.subject, where, base_name) + "."]
        if mc.signs_total or mc.signs_unresolved:
            base = pmap.rows[pmap.baseline]
            lines.append(f"Signs against {base}: {mc.signs_agree} of {mc.signs_total} rows whose paired 95% interval "
                         f"against {base} excludes 0 differ from {base} in the same direction in both tables; "
                         f"{mc.signs_unresolved} more have an interval that includes 0 and are not compared.")
        if mc.paper_metric in pmap.notes:
            lines.append(f"Note on the paper's {mc.paper_metric}: {pmap.notes[mc.paper_metric]}")
    if c.absent:
        lines += ["", f"{'None of its columns' if not c.metrics else 'Not compared'}: {'; '.join(c.absent)}: no "
                      "column of ours in the store (the benchmark has not run: `tvkd eval <run> --bench ...`)."]
    if notes:
        lines += [""] + list(dict.fromkeys(notes))
    return "\n".join(lines) + "\n"


def comparison_figure(c: Comparison) -> Any:
    """Per metric: paper value (x) against ours (y), each row labelled; None when nothing was compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in c.metrics if len(m.cells)]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), squeeze=False)
    for ax, mc in zip(axes[0], shown):
        ax.scatter(mc.cells["paper"], mc.cells["ours"], s=18, color="tab:blue")
        for _, r in mc.cells.iterrows():
            ax.annotate(str(r["paper_row"]), (r["paper"], r["ours"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        tau = "" if mc.tau is None else f"\nτ = {mc.tau:.2f} (n = {mc.n}, p = {mc.p_value:.2f})"
        ax.set_title(f"{mc.paper_metric}{tau}", fontsize=9)
        ax.set_xlabel("paper", fontsize=8)
        ax.set_ylabel(f"ours: {mc.ours_column}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def write_comparison(c: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """``paper_<name>.md`` (the text) and, when anything was compared, ``paper_<name>.png/.pdf``."""
    import matplotlib.pyplot as plt


    out_dir = Path(out_dir)
    stem = out_dir / f"paper_{c.map.name}"
    paths = {"md": stem.with_suffix(".md")}
    atomic_write_text(paths["md"], format_comparison(c))
    fig = comparison_figure(c)
    if fig is not None:
        paths.update(save_figure(fig, stem))
        plt.close(fig)
    return paths


def compare_study(frame: pd.DataFrame, spec: Any, generators: list[str], *, study: str = "",
                  profile: str | None = None) -> list[Comparison]:
    """Every paper map of the study's generators that applies to ``profile``, applied to ``frame``."""
    out = []
    for name in generators:
        for pmap in paper_maps_for(name):
            if pmap.applies(profile):
                out.append(compare_to_paper(frame, pmap, study=study or spec.name, profile=profile))
    return out


# --------------------------------------------------------------------------------------------
# The maps of the reward-conflict table (Table 5) and the main table (Tables 1, 6, 7)
# --------------------------------------------------------------------------------------------

register_paper_maps(
    "reward_conflict",
    PaperMap(
        name="table5", table="table5", row_column="name", column_column="metric",
        rows={"logits": "Logits", "log_prob": "Log Probability", "max": "Max", "margin": "Margin",
              "expectation": "Expectation", "soft_value": "Ours", "dpo": "DPO"},
        # the testbed's oracle is its judge: oracle score stands in for MT-Bench, the win rate against the
        # soft_value run for AlpacaEval "with our method as a baseline"
        # the paper reports MT-Bench's first turn: our turn-1 mean, not the mean over both turns
        columns={"Margin Acc.": ("margin_accuracy",), "MT-bench": ("mt_bench/turn1", "oracle_score"),
                 "AE": ("alpaca_eval/win_rate", "win_rate_vs_soft_value")},
        scale={"margin_accuracy": 100.0, "win_rate_vs_soft_value": 100.0},
        row_key="label", baseline="dpo",
        borrow={"dpo": {"MT-bench": ("table1", {"dataset": "DPOMIX", "method": "DPO", "metric": "MT"})}},
        subject="aux rewards",
        notes={"Margin Acc.": "its values (18.29–30.23%) are below the 50% that chance gives an accuracy counting "
                              "ties as ½, as ours does, so it is likely another quantity (e.g. a share of pairs "
                              "above some margin); compare its ranks, not its values, with ours."},
    ),
)

_MAIN_ROWS = {"teacher_dpo": "DPO Teacher", "teacher_sft": "SFT Teacher", "sft": "SFT", "dpo": "DPO",
              "simpo": "SimPO", "wpo": "WPO", "tdpo": "TDPO", "vanilla_kd": "VanillaKD", "seqkd": "SeqKD",
              "ddpo": "DDPO", "dpkd": "DPKD", "gkd": "GKD", "dckd": "DCKD", "adpa": "ADPA"}
_MAIN_COLUMNS = {"RM": ("rm/score", "oracle_score"), "MT": ("mt_bench/turn1",),  # the paper reports turn 1
                 "AE": ("alpaca_eval/win_rate", "win_rate_vs_adpa"), "OLL": ("oll/average",)}
_MAIN_SCALE = {"win_rate_vs_adpa": 100.0, "oll/average": 100.0}
# Tables 6-7's ARC column is ARC-easy; the oll benchmark runs the leaderboard's ARC-challenge, so it is not mapped.
_OLL_COLUMNS = {"Average": ("oll/average",), "GSM8K": ("oll/gsm8k",), "Hellaswag": ("oll/hellaswag",),
                "MMLU": ("oll/mmlu",), "TruthfulQA": ("oll/truthfulqa",), "Winogrande": ("oll/winogrande",)}
_OLL_ROWS = {**_MAIN_ROWS, "teacher_dpo": "DPO teacher", "teacher_sft": "SFT teacher", "tvkd": "TVKD (Ours)"}

register_paper_maps(
    "main_table",
    *(PaperMap(name=f"table1_{dataset.lower()}", table="table1", row_column="method", column_column="metric",
               where={"dataset": dataset}, rows={**_MAIN_ROWS, "tvkd": "TVKD(Ours)"}, columns=_MAIN_COLUMNS,
               scale=_MAIN_SCALE, row_key="label", baseline="dpo", unranked=("teacher_dpo", "teacher_sft"),
               profiles=profiles, subject="student methods", baseline_is_subject=True)
      for dataset, profiles in (("DPOMIX", (None, "paper")), ("Helpsteer2", ("paper-helpsteer2",)))),
    *(PaperMap(name=table, table=table, row_column="method", column_column="task", rows=_OLL_ROWS,
               columns=_OLL_COLUMNS, scale={c[0]: 100.0 for c in _OLL_COLUMNS.values()}, row_key="label",
               baseline="dpo", unranked=("teacher_dpo", "teacher_sft"), profiles=profiles, subject="student methods",
               baseline_is_subject=True)
      for table, profiles in (("table6", (None, "paper")), ("table7", ("paper-helpsteer2",)))),
)
