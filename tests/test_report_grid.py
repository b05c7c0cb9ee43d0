"""The generic table of a study of one's own (reports/grid.py): one row per configuration, mean ± std checked
against an independent computation, the paired Δ against the reference variant of the same axis values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.grid import write_grid_tables
from reports.store import write_study_outputs
from studies.spec import parse_spec
from tests.report_checks import assert_cell, markdown_rows

SPEC = {
    "name": "my-grid", "seeds": [0, 1, 2], "reference_variant": "dpo",
    "base": {"models": {"student": "s", "teacher": "t"}, "data": {"source": "d.jsonl"}},
    "variants": [{"label": "dpo", "loss": {"name": "dpo"}}, {"label": "tvkd", "loss": {"name": "tvkd"}}],
    "axes": {"loss.beta": [0.1, 0.3]},
}
PROMPTS = [f"p{i}" for i in range(5)]


def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1, 2):
        for variant in ("dpo", "tvkd"):
            for beta in (0.1, 0.3):
                scores = {p: float(rng.uniform(0.4, 0.8)) + (0.05 if variant == "tvkd" else 0) for p in PROMPTS}
                pairs = [float(x) for x in rng.integers(0, 2, 8)]
                rows.append({"label": f"{variant},loss.beta={beta}", "variant": variant, "loss.beta": beta,
                             "seed": seed, "oracle_score": float(np.mean(list(scores.values()))),
                             "margin_accuracy": float(np.mean(pairs)), "items.oracle_score": scores,
                             "items.margin_accuracy": pairs})
    return pd.DataFrame(rows)


def test_a_custom_grid_gets_a_table_per_configuration_with_the_paired_interval(tmp_path):
    spec, df = parse_spec(SPEC), frame()
    written = write_grid_tables(spec, df, tmp_path)
    assert set(written) == {"md", "tex"} and "\\begin{tabular}" in written["tex"].read_text()
    rows = markdown_rows(written["md"].read_text())
    assert [r[:2] for r in rows] == [["dpo", "0.1"], ["dpo", "0.3"], ["tvkd", "0.1"], ["tvkd", "0.3"]]
    for row in rows:
        mine = df[(df["variant"] == row[0]) & (df["loss.beta"] == float(row[1]))]
        assert_cell(row[2], list(mine["oracle_score"]), 3)
        assert_cell(row[3].replace(" ", " "), [100 * v for v in mine["margin_accuracy"]], 1)
        assert row[-1] == "3"
    # Δ oracle of tvkd at β = 0.3 against dpo at β = 0.3, per prompt and seed, averaged over seeds
    tvkd, dpo = (df[(df["variant"] == v) & (df["loss.beta"] == 0.3)].set_index("seed") for v in ("tvkd", "dpo"))
    expected = np.mean([np.mean([tvkd.loc[s, "items.oracle_score"][p] - dpo.loc[s, "items.oracle_score"][p]
                                 for p in PROMPTS]) for s in (0, 1, 2)])
    cell = rows[3][4]
    assert abs(float(cell.split(" [")[0]) - expected) <= 0.0005 + 1e-9, (cell, expected)
    low, high = (float(x) for x in cell.split("[")[1].split("]")[0].split(", "))
    assert low <= expected <= high
    assert rows[1][4] == "–"  # the reference row itself


def test_write_study_outputs_falls_back_to_the_grid_table(tmp_path):
    spec, df = parse_spec(SPEC), frame()
    written = write_study_outputs(spec, df, tmp_path)
    assert set(written) == {"grid", "runs"} and (tmp_path / "grid.md").is_file() and (tmp_path / "runs.csv").is_file()
    first = (tmp_path / "grid.md").read_bytes()
    write_study_outputs(spec, df, tmp_path)
    assert (tmp_path / "grid.md").read_bytes() == first  # byte-identical on a rebuild
