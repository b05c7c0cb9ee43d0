"""The testbed-power table: do the testbed's claims hold on every build, and across builds?

Input: the frame of `studies/testbed_power.yaml`, one row per run with `variant` (``dpo``, the controls, the
aux rewards, the dial's ``rho=<ρ>``), the build axis `testbed.seed`, `seed`, `oracle_score`,
`margin_accuracy` and the per-item columns `items.oracle_score` / `items.margin_accuracy`.

Each build is a testbed of its own (its own world, prompts, teacher and student), so every row is paired
with DPO of the same build and seed, per test prompt (`reports.effects.crossed_effect`: seeds × prompts
crossed, within the build). Builds are then pooled two ways (`reports.effects`):

- **these builds** (`builds_fixed_effect`): the mean of the per-build effects, its variance the sum of
  theirs / B²: is there an effect on the builds that were run?
- **a new build** (`across_builds_effect`): a t-interval over the B per-build effects (B − 1 degrees of
  freedom): what the effect is over builds in general, the claim a sentence about "the testbed" makes.

Output: `testbed_power.md` / `.tex`: per row the per-build Δ oracle score with its interval, both pooled
intervals with their minimal detectable effects, the new-build interval in margin accuracy, and how many
builds show an interval above (or below) 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from reports.effects import (
    Effect,
    across_builds_effect,
    builds_fixed_effect,
    effects_by_row,
    format_effect,
    items_column,
)
from reports.tables import TABLES, MetricSpec, format_seeds, format_table, write_table_files

__all__ = ["BUILD", "power_summary", "format_testbed_power", "write_testbed_power"]

STUDY = "testbed-power"
REFERENCE = "dpo"
#: The frame's column of the testbed build (the study's axis).
BUILD = "testbed.seed"
ORACLE = MetricSpec("Oracle score", higher_is_better=True, digits=3)
ACCURACY = MetricSpec("Margin accuracy (%)", higher_is_better=True, digits=1, percent=True)
#: Display names of the study's variants; another variant shows its label.
NAMES = {
    "dpo-oracle-labels": "DPO on oracle labels (ceiling)",
    "oracle-gap": "oracle gap (positive control)",
    "soft_value-shuffled": "soft_value, shuffled Ψ (negative control)",
    "rho=1.00": "dial ρ = 1 (oracle offsets, unit spread)",
    "rho=0.50": "dial ρ = 0.5",
    "rho=0.00": "dial ρ = 0 (all offsets permuted)",
}


def _variant(df: pd.DataFrame) -> pd.Series:
    return df["variant"] if "variant" in df.columns else df["label"]


def _with_mde(effect: Effect | None, spec: MetricSpec) -> str:
    cell = format_effect(effect, spec)
    if effect is not None and not math.isnan(effect.mde()):
        cell += f"; {effect.mde() * (100 if spec.percent else 1):.{spec.digits}f}"
    return cell


def _signs(effects: list[Effect | None]) -> str:
    present = [e for e in effects if e is not None and not math.isnan(e.low)]
    if not present:
        return "–"
    above = sum(e.low > 0 for e in present)
    below = sum(e.high < 0 for e in present)
    return f"{above} above, {below} below of {len(present)}"


def power_summary(df: pd.DataFrame) -> tuple[pd.DataFrame, list[object]]:
    """One row per variant other than DPO (in the frame's order) with its per-build effects and the two pooled
    ones, per metric: ``build.<b>.<metric>``, ``fixed.<metric>``, ``random.<metric>`` (`Effect` or None); and the
    builds, in order."""
    for column in ("seed", BUILD):
        if column not in df.columns:
            raise KeyError(f"testbed_power: column {column!r} is missing (a frame of the testbed-power study has "
                           f"the build axis {BUILD!r}); the frame has {list(df.columns)}")
    df = df.assign(_variant=_variant(df))
    builds = sorted(set(df[BUILD]), key=lambda b: (str(type(b)), b))
    rows = [v for v in dict.fromkeys(df["_variant"]) if v != REFERENCE]
    records: list[dict[str, object]] = [{"key": v, "Row": NAMES.get(v, v)} for v in rows]
    for metric in ("oracle_score", "margin_accuracy"):
        if items_column(metric) not in df.columns:
            df[items_column(metric)] = None
        per_build: dict[object, list[Effect | None]] = {}
        for build in builds:
            part = df[df[BUILD] == build]
            per_build[build] = effects_by_row(part, "_variant", rows, REFERENCE, [metric],
                                              table=f"testbed_power (build {build})")[metric]
        for i, record in enumerate(records):
            effects = [per_build[b][i] for b in builds]
            for b, e in zip(builds, effects):
                record[f"build.{b}.{metric}"] = e
            record[f"fixed.{metric}"] = builds_fixed_effect(effects)
            record[f"random.{metric}"] = across_builds_effect(effects)
            record[f"signs.{metric}"] = _signs(effects)
    counts = df.groupby("_variant").size()
    for record in records:
        record["n"] = int(counts.get(record["key"], 0))
    return pd.DataFrame.from_records(records), builds


def _caption(df: pd.DataFrame, builds: list[object]) -> str:
    seeds = format_seeds(df["seed"])
    ref = df[_variant(df) == REFERENCE]
    dpo = ", ".join(f"build {b}: {ref.loc[ref[BUILD] == b, 'oracle_score'].mean():.3f}" for b in builds
                    if "oracle_score" in ref.columns and (ref[BUILD] == b).any())
    return (
        f"The testbed's claims over {len(builds)} testbed builds (build seeds {', '.join(map(str, builds))}: each a "
        f"world, teacher and student of its own) × training seeds {seeds} (a seed changes the pairs' 80% subsample "
        "and their order, not the init). Δ: the paired difference to DPO of the same build and seed per test "
        "prompt, in oracle score unless named. Per build: a 95% crossed seed × prompt interval. These builds: "
        "the mean of the per-build differences, variance Σ SE_b²/B² with Satterthwaite degrees of freedom (an "
        "effect on the builds that were run). A new build: a t-interval over the per-build differences with "
        "B − 1 degrees of freedom (an effect of the method on the testbed in general; its coverage holds whatever the "
        "builds' share of the variation, but with 3 builds it rests on 2 degrees of freedom, so its width is itself "
        "uncertain: a narrow one says only that the builds agreed). After "
        "the ;: the minimal detectable effect (80% power, 5% level, noncentral t). Builds: how many per-build "
        "intervals lie above / below 0. "
        + (f"DPO's mean oracle score, {dpo}." if dpo else "")
    )


def format_testbed_power(df: pd.DataFrame, fmt: str = "markdown") -> str:
    summary, builds = power_summary(df)
    columns: dict[str, str] = {}
    for b in builds:
        column = f"cell.build.{b}"
        summary[column] = [format_effect(e, ORACLE) for e in summary[f"build.{b}.oracle_score"]]
        columns[column] = f"Δ build {b} [95% CI]"
    summary["cell.fixed"] = [_with_mde(e, ORACLE) for e in summary["fixed.oracle_score"]]
    columns["cell.fixed"] = "Δ these builds [95% CI]; MDE"
    summary["cell.random"] = [_with_mde(e, ORACLE) for e in summary["random.oracle_score"]]
    columns["cell.random"] = "Δ a new build [95% CI]; MDE"
    summary["cell.signs"] = summary["signs.oracle_score"]
    columns["cell.signs"] = "Builds vs 0"
    summary["cell.accuracy"] = [_with_mde(e, ACCURACY) for e in summary["random.margin_accuracy"]]
    columns["cell.accuracy"] = "Δ margin acc. (pts), a new build [95% CI]; MDE"
    return format_table(summary, metrics={}, row_label_cols=["Row"], fmt=fmt, highlight=False,
                        extra_cols=columns, caption=_caption(df, builds),
                        label="tab:testbed-power" if fmt == "latex" else None)


@TABLES.register(
    "testbed_power", study=STUDY, paper="(no table: the power of the testbed over builds)",
    outputs=("testbed_power.md", "testbed_power.tex"),
    columns=("variant", BUILD, "seed", "oracle_score", "margin_accuracy", items_column("oracle_score"),
             items_column("margin_accuracy")),
)
def write_testbed_power(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``testbed_power.md`` and ``testbed_power.tex`` into ``out_dir``."""
    return write_table_files(out_dir, "testbed_power", "reports/testbed_power.py",
                             lambda fmt: format_testbed_power(df, fmt))
