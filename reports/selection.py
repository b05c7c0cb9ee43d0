"""Per-variant selection on validation: a study's ``select`` (`studies.spec.Selection`) applied to its frame.

A study with ``select: {metric: oracle_score, over: learning_rate, values: [...]}`` runs every variant at every
value of ``train.learning_rate`` (`Selection.axis`), each run evaluated on its validation split
(``data.validation_fraction``) as well as on test. Here, for each group of runs that differ only in that value
(a variant, and the study's other axis values), the value with the best mean validation metric (``val/<metric>``,
higher is better) over the seeds is picked; a tie goes to the value listed first, a value without any run that
has the metric is not a candidate. `write_study_outputs` (`reports.store`) then builds every table of the study
from the picked runs only (their test numbers), each labelled as its group (``dpo``, not
``dpo,train.learning_rate=1e-05``, so a table generator and a ``reference_variant`` read it as a plain study's),
the picked value kept in the axis's column; the win rates against the reference are recomputed between the
picks (each method's pick against the reference's pick, same seed). ``selection.md`` / ``selection.csv`` list
each candidate's validation mean and its test mean, and the pick; ``runs.csv`` marks the picked runs.

``over: checkpoints``: every run picked its own checkpoint on validation while it trained (``eval.checkpoints``,
`tvkd.evaluation.validation`), so every run is a pick and the tables are built from all of them; ``selection.md``
/ ``selection.csv`` (`checkpoint_candidates`) list, per group and evaluated step, the validation mean over the
seeds and how many seeds' runs picked that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from studies.spec import format_value, reference_label
from tvkd.evaluation.metrics import win_rate
from tvkd.paths import atomic_write_text

__all__ = ["TEST_COLUMNS", "SelectionResult", "checkpoint_candidates", "group_label", "select_runs",
           "write_checkpoint_selection", "write_selection"]

#: The test column reported beside the validation metric picked by: the first one the frame has.
TEST_COLUMNS = {"oracle_score": ("oracle_score",), "rm_score": ("rm/score", "oracle_score")}
PICKED = "picked"


@dataclass
class SelectionResult:
    picked: pd.DataFrame  # the picked runs, one per (group, seed), labelled by their group
    candidates: pd.DataFrame  # one row per (group, value): validation and test mean, std, seeds, picked
    frame: pd.DataFrame  # every run, with a ``picked`` column
    metric: str  # the validation column picked by (val/<metric>)
    test_metric: str | None  # the test column shown beside it
    axis: str


def group_label(label: str, axis: str, default: str) -> str:
    """A run label without its ``<axis>=<value>`` part (``dpo,train.learning_rate=1e-05`` -> ``dpo``)."""
    return ",".join(p for p in str(label).split(",") if not p.startswith(f"{axis}=")) or default


def _stats(values: pd.Series) -> tuple[float, float, int]:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def select_runs(spec: Any, frame: pd.DataFrame) -> SelectionResult:
    """Pick, per group, the value of ``spec.select.axis`` with the best mean validation metric over seeds."""
    sel = spec.select
    axis, metric = sel.axis, sel.column
    test_metric = next((c for c in TEST_COLUMNS[sel.metric] if c in frame.columns), None)
    df = frame.reset_index(drop=True)
    groups = [group_label(label, axis, spec.name) for label in df["label"]]
    rows, keep = [], np.zeros(len(df), dtype=bool)
    for group in dict.fromkeys(groups):
        in_group = np.array([g == group for g in groups])
        candidates = []
        for value in sel.values:
            at = in_group & np.array([v == value for v in df[axis]]) if axis in df.columns else in_group & False
            runs = df[at]
            val = _stats(runs[metric]) if metric in runs.columns else (float("nan"), float("nan"), 0)
            test = _stats(runs[test_metric]) if test_metric else (float("nan"), float("nan"), 0)
            candidates.append((value, at, val, test))
        scored = [c for c in candidates if c[2][2] > 0]
        best = max(scored, key=lambda c: c[2][0], default=None)  # max keeps the first of equal means
        for value, at, val, test in candidates:
            chosen = best is not None and value == best[0]
            if chosen:
                keep |= at
            rows.append({"label": group, axis: value, f"{metric}.mean": val[0], f"{metric}.std": val[1],
                         "seeds": val[2], **({f"{test_metric}.mean": test[0], f"{test_metric}.std": test[1]}
                                             if test_metric else {}), PICKED: chosen})
    whole = df.assign(**{PICKED: keep})
    picked = df[keep].copy()
    picked["label"] = [g for g, k in zip(groups, keep) if k]
    picked = _recompute_win_rates(spec, picked.reset_index(drop=True))
    return SelectionResult(picked=picked, candidates=pd.DataFrame(rows), frame=whole, metric=metric,
                           test_metric=test_metric, axis=axis)


def _recompute_win_rates(spec: Any, picked: pd.DataFrame) -> pd.DataFrame:
    """``win_rate_vs_<reference>`` between the picks: each run's greedy test outputs against those of the
    reference's pick of the same seed (`reports.store.frame_from_records` paired them at the same rate)."""
    ref = spec.reference_variant
    if not ref:
        return picked
    column = f"win_rate_vs_{ref}"
    if column not in picked.columns or "items.oracle_score" not in picked.columns:
        return picked.drop(columns=[column], errors="ignore")
    labels = set(picked["label"])
    by = {(s, label): items for s, label, items in zip(picked["seed"], picked["label"], picked["items.oracle_score"])}
    rates = []
    for label, seed, variant, mine in zip(picked["label"], picked["seed"], picked.get("variant", [None] * len(picked)),
                                          picked["items.oracle_score"]):
        other = reference_label(ref, label, variant, labels)
        theirs = by.get((seed, other)) if other else None
        common = [p for p in (mine or {}) if p in (theirs or {})] if isinstance(mine, dict) else []
        rates.append(win_rate([mine[p] for p in common], [theirs[p] for p in common]) if common else float("nan"))
    return picked.assign(**{column: rates})


def _cell(mean: float, std: float, digits: int = 4) -> str:
    return "–" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_selection(result: SelectionResult, spec: Any, out_dir: str | Path) -> dict[str, Path]:
    """``selection.csv`` (every candidate, raw numbers) and ``selection.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "selection.csv", "md": out / "selection.md"}
    cands = result.candidates
    atomic_write_text(paths["csv"], cands.to_csv(index=False))
    m, t, axis = result.metric, result.test_metric, result.axis
    header = ["label", axis, f"{m} (mean ± std)", "seeds", *([f"test {t} (mean ± std)"] if t else []), "picked"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in cands.to_dict("records"):
        cells = [str(r["label"]), format_value(r[axis]), _cell(r[f"{m}.mean"], r[f"{m}.std"]), str(r["seeds"]),
                 *([_cell(r[f"{t}.mean"], r[f"{t}.std"])] if t else []), "**picked**" if r[PICKED] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    unpicked = [g for g in dict.fromkeys(cands["label"]) if not cands[(cands["label"] == g) & cands[PICKED]].shape[0]]
    picks = ", ".join(f"{r['label']}: {format_value(r[axis])}" for r in cands[cands[PICKED]].to_dict("records"))
    caption = (f"{spec.name}: per method, the {axis} with the best mean {m} over seeds (higher is better; a tie goes "
               f"to the value listed first) on the validation split held out of the training prompts; the study's "
               f"tables report the test numbers of the picked runs. Picks: {picks or 'none'}."
               + (f" No validation value, nothing picked: {', '.join(unpicked)}." if unpicked else ""))
    atomic_write_text(paths["md"], "<!-- Generated by reports/selection.py from the results store; do not edit by "
                      f"hand. -->\n\n{caption}\n\n" + "\n".join(lines) + "\n")
    return paths


def checkpoint_candidates(spec: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run label, evaluated step) of a study that picks checkpoints: the mean, std and count over the
    seeds of ``val/<metric>`` at that step (each run's ``val/checkpoints`` in its metrics.json), and in how many
    seeds' runs it was the pick (``val/checkpoint_step``)."""
    metric = spec.select.column
    scores: dict[tuple[str, int], list[float]] = {}
    picked: dict[tuple[str, int], int] = {}
    for label, record in zip(frame["label"], frame["record"] if "record" in frame.columns else [None] * len(frame)):
        metrics = getattr(record, "metrics", None) or {}
        for row in metrics.get("val/checkpoints") or []:
            if isinstance(row.get(metric), (int, float)):
                scores.setdefault((label, int(row["step"])), []).append(float(row[metric]))
        if isinstance(metrics.get("val/checkpoint_step"), int):
            key = (label, metrics["val/checkpoint_step"])
            picked[key] = picked.get(key, 0) + 1
    rows = []
    for (label, step), values in scores.items():
        mean, std, n = _stats(pd.Series(values))
        rows.append({"label": label, "step": step, f"{metric}.mean": mean, f"{metric}.std": std, "seeds": n,
                     "picked_by_seeds": picked.get((label, step), 0)})
    order = {label: i for i, label in enumerate(dict.fromkeys(frame["label"]))}
    rows.sort(key=lambda r: (order[r["label"]], r["step"]))
    return pd.DataFrame(rows, columns=["label", "step", f"{metric}.mean", f"{metric}.std", "seeds", "picked_by_seeds"])


def write_checkpoint_selection(spec: Any, frame: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """``selection.csv`` and ``selection.md`` of a study that picks checkpoints (`checkpoint_candidates`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "selection.csv", "md": out / "selection.md"}
    cands = checkpoint_candidates(spec, frame)
    atomic_write_text(paths["csv"], cands.to_csv(index=False))
    m = spec.select.column
    header = ["label", "step", f"{m} (mean ± std)", "seeds", "picked by (seeds)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in cands.to_dict("records"):
        lines.append("| " + " | ".join([str(r["label"]), str(r["step"]), _cell(r[f"{m}.mean"], r[f"{m}.std"]),
                                        str(r["seeds"]), str(r["picked_by_seeds"] or "")]) + " |")
    fractions = ", ".join(format_value(v) for v in spec.select.values)
    caption = (f"{spec.name}: every run evaluated its policy on the validation split held out of the training prompts "
               f"at these fractions of its training steps ({fractions}) and kept the weights of the best {m} (a tie "
               "keeps the earlier step); the study's tables report the test numbers of those weights. Per run label "
               "and step: the validation mean over seeds, and how many seeds' runs picked that step.")
    atomic_write_text(paths["md"], "<!-- Generated by reports/selection.py from the results store; do not edit by "
                      f"hand. -->\n\n{caption}\n\n" + "\n".join(lines) + "\n")
    return paths
