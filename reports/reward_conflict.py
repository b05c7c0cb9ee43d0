"""The reward-conflict table (the paper's Table 5): TVKD with each auxiliary reward, against DPO
and the shuffled negative control.

Input: one row per finished run with the columns

    method                  "tvkd" or "dpo"
    aux                     the aux reward of a TVKD run (None for DPO)
    control                 "none" | "shuffled" (missing/None reads as "none")
    seed
    margin_accuracy         fraction in [0, 1] (docs/methods.md §A.6: the student's implicit-reward accuracy)
    oracle_score            mean oracle reward r*(x, y) of the student's generations
    win_rate_vs_soft_value  fraction of prompts the run's generations beat TVKD(soft_value)'s

Other columns are ignored. Rows: the six aux rewards of docs/methods.md §A.2 in the paper's order, then
"DPO" (no teacher) and "soft_value (shuffled Ψ)" (the teacher offsets permuted across pairs; a
gain it also shows is not teacher knowledge). Each cell is mean ± std over seeds; a row without
finished runs stays in the table with "–". Only the aux rewards and DPO are ranked for the
bold/second marks: the control is a diagnostic, not a method, and in the win-rate column the
soft_value row is the opponent itself.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reports.tables import TABLES, MetricSpec, format_table, summarize
from tvkd.paths import atomic_write_text

__all__ = ["METRICS", "ROWS", "TableRow", "format_reward_conflict", "reward_conflict_summary",
           "write_reward_conflict_tables"]

STUDY = "reward-conflict"
METRICS: dict[str, MetricSpec] = {
    "margin_accuracy": MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True),
    "oracle_score": MetricSpec("Oracle score", higher_is_better=True, digits=3),
    "win_rate_vs_soft_value": MetricSpec("Win rate vs soft_value (%)", higher_is_better=True, digits=1, percent=True),
}
REQUIRED_COLUMNS = ("method", "seed")


@dataclass(frozen=True)
class TableRow:
    """One row of the table and the runs it selects (method, aux, control)."""

    key: str
    type: str  # "action" | "state" | "–" | "control"
    name: str
    formula_tex: str | None  # LaTeX math, or None for "–"
    formula_text: str | None  # the same, readable as plain text
    method: str
    aux: str | None
    control: str
    ranked: bool = True


_SOFT_VALUE_TEX = r"$\beta_V \log \sum_a \exp(z(a)/\beta_V)$"
_SOFT_VALUE_TEXT = "β_V log Σ_a exp(z(a)/β_V)"

#: The rows in table order; formulas are the teacher quantities of docs/methods.md §A.2, π = softmax(z).
ROWS: tuple[TableRow, ...] = (
    TableRow("logits", "action", "logits", r"$z(a)$", "z(a)", "tvkd", "logits", "none"),
    TableRow("log_prob", "action", "log_prob", r"$\log \pi(a)$", "log π(a)", "tvkd", "log_prob", "none"),
    TableRow("max", "state", "max", r"$\max_a \pi(a)$", "max_a π(a)", "tvkd", "max", "none"),
    TableRow("margin", "state", "margin", r"$\pi(1) - \pi(2)$", "π(1) − π(2)", "tvkd", "margin", "none"),
    TableRow("expectation", "state", "expectation", r"$\sum_a \pi(a)\, z(a)$", "Σ_a π(a) z(a)",
             "tvkd", "expectation", "none"),
    TableRow("soft_value", "state", "soft_value", _SOFT_VALUE_TEX, _SOFT_VALUE_TEXT, "tvkd", "soft_value", "none"),
    TableRow("dpo", "–", "DPO", None, None, "dpo", None, "none"),
    TableRow("soft_value_shuffled", "control", "soft_value (shuffled Ψ)", _SOFT_VALUE_TEX, _SOFT_VALUE_TEXT,
             "tvkd", "soft_value", "shuffled", ranked=False),
)


def _normalized(value: object, default: str | None) -> str | None:
    """Lower-case text, with None/NaN/""/"none" meaning ``default``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    text = str(value).strip().lower()
    return default if text in ("", "none", "null", "nan") else text


def _assign_rows(df: pd.DataFrame) -> pd.Series:
    """The table row key of each run (None for runs that belong to no row)."""
    method = [_normalized(v, None) for v in df["method"]]
    aux = [_normalized(v, None) for v in df["aux"]] if "aux" in df.columns else [None] * len(df)
    control = [_normalized(v, "none") for v in df["control"]] if "control" in df.columns else ["none"] * len(df)
    keys = []
    for m, a, c in zip(method, aux, control):
        key = None
        for row in ROWS:
            # DPO has no teacher, so its aux (if any was recorded) does not select anything.
            if m == row.method and c == row.control and (row.method == "dpo" or a == row.aux):
                key = row.key
                break
        keys.append(key)
    return pd.Series(keys, index=df.index, dtype="object")


def reward_conflict_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One summary row per `ROWS` entry, in table order: key, Type, Name, formulas, ranked, n and
    ``<metric>.mean/.std/.n``. Rows without runs get n = 0 and NaN metrics.

    Raises KeyError for missing ``method``/``seed`` columns and ValueError when a row holds two
    runs of one seed (the frame mixes configurations: filter it to one per seed first). Runs
    that match no row, and absent metric columns, are reported with a warning.
    """
    absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if absent:
        raise KeyError(f"reward_conflict: columns {absent} are missing; the frame has {list(df.columns)}")
    df = df.copy()
    for metric in METRICS:
        if metric not in df.columns:
            warnings.warn(f"reward_conflict: no {metric!r} column; that column of the table shows –", stacklevel=2)
            df[metric] = math.nan
    df["_row"] = _assign_rows(df)
    stray = df[df["_row"].isna()]
    if len(stray):
        kinds = sorted({f"method={m!r} aux={a!r} control={c!r}" for m, a, c in zip(
            stray["method"], stray.get("aux", [None] * len(stray)), stray.get("control", ["none"] * len(stray)))})
        warnings.warn(f"reward_conflict: {len(stray)} runs match no table row and are not shown: {'; '.join(kinds)}",
                      stacklevel=2)
    df = df[df["_row"].notna()]
    duplicated = df[df.duplicated(["_row", "seed"], keep=False)]
    if len(duplicated):
        where = sorted({(k, s) for k, s in zip(duplicated["_row"], duplicated["seed"])}, key=str)
        raise ValueError(f"reward_conflict: several runs for one (row, seed): {where}; "
                         f"filter the frame to one configuration per seed")
    summary = summarize(df, by=["_row"], metrics=list(METRICS))
    spec = pd.DataFrame(
        [{"key": r.key, "Type": r.type, "Name": r.name, "formula_tex": r.formula_tex,
          "formula_text": r.formula_text, "ranked": r.ranked} for r in ROWS]
    )
    out = spec.merge(summary.rename(columns={"_row": "key"}), on="key", how="left")
    count_cols = ["n"] + [f"{m}.n" for m in METRICS]
    out[count_cols] = out[count_cols].fillna(0).astype(int)
    return out


def _seeds(df: pd.DataFrame) -> list[object]:
    """The distinct seeds of the runs shown in the table, sorted (numbers first)."""
    matched = df[_assign_rows(df).notna()]
    seeds = []
    for s in pd.unique(matched["seed"]):
        if isinstance(s, numbers.Real) and not isinstance(s, bool):
            if math.isnan(s):
                continue
            s = int(s) if float(s).is_integer() else float(s)
        seeds.append(s)
    return sorted(seeds, key=lambda s: (0, s, "") if isinstance(s, (int, float)) else (1, 0, str(s)))


def _caption(df: pd.DataFrame, fmt: str) -> str:
    seeds = _seeds(df)
    second = "underlined" if fmt == "latex" else "italic"
    return (
        "Reward conflict (the paper's Table 5): TVKD with each auxiliary reward, DPO, and the shuffled "
        f"control. Mean ± std over seeds {', '.join(map(str, seeds)) or '(none)'}; n = runs per row "
        "(std 0 when n = 1). Margin accuracy and win rate in %. "
        f"Bold: best, {second}: second best among the aux rewards and DPO (not ranked: the control, and "
        "soft_value in its own win-rate column); "
        "– : no finished run."
    )


def _ranked(summary: pd.DataFrame) -> dict[str, list[bool]]:
    """Rows competing for the marks, per metric: the control never; in the win-rate column not
    the soft_value row either, since it is the opponent every win rate is measured against."""
    ranked = summary["ranked"].tolist()
    opponent = [k != "soft_value" for k in summary["key"]]
    return {m: [r and o for r, o in zip(ranked, opponent)] if m == "win_rate_vs_soft_value" else ranked
            for m in METRICS}


def format_reward_conflict(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table as Markdown or LaTeX text (with its caption), from per-run rows."""
    summary = reward_conflict_summary(df)
    latex = fmt == "latex"
    summary["Formula"] = summary["formula_tex" if latex else "formula_text"]
    first_reference = next(i for i, r in enumerate(ROWS) if r.key == "dpo")
    return format_table(
        summary,
        metrics=METRICS,
        row_label_cols=["Type", "Name", "Formula"],
        fmt=fmt,
        ranked=_ranked(summary),
        latex_cols={"Formula"},
        caption=_caption(df, fmt),
        label="tab:reward_conflict" if latex else None,
        rules_before={first_reference, len(ROWS) - 1},
    )


@TABLES.register(
    "reward_conflict", study=STUDY, paper="Table 5", outputs=("reward_conflict.md", "reward_conflict.tex"),
    columns=("method", "aux", "control", "seed", *METRICS),
)
def write_reward_conflict_tables(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``reward_conflict.md`` and ``reward_conflict.tex`` into ``out_dir`` (atomically);
    returns ``{"md": path, "tex": path}``."""
    out_dir = Path(out_dir)
    source = "reports/reward_conflict.py"
    paths = {"md": out_dir / "reward_conflict.md", "tex": out_dir / "reward_conflict.tex"}
    markdown = f"<!-- Generated by {source} from the results store; do not edit by hand. -->\n\n"
    latex = f"% Generated by {source} from the results store; do not edit by hand.\n"
    atomic_write_text(paths["md"], markdown + format_reward_conflict(df, "markdown"))
    atomic_write_text(paths["tex"], latex + format_reward_conflict(df, "latex"))
    return paths
