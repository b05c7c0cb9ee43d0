"""The teacher-signal dial's table and figure, from a synthetic study frame."""

from __future__ import annotations

import numpy as np
import pandas as pd

from reports.teacher_signal_dial import dial_summary, format_dial, write_teacher_signal_dial

PROMPTS = [f"p{i}" for i in range(50)]


def frame(gain_at_one: float = 0.02) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        base = rng.random(len(PROMPTS)) * 0.5 + 0.3
        for label, rho, gain in [("dpo", None, 0.0), ("rho=1.00", 1.0, gain_at_one), ("rho=0.50", 0.5, gain_at_one / 2),
                                 ("rho=0.00", 0.0, 0.0), ("soft_value", 0.05, 0.0), ("log_prob", 0.3, 0.004)]:
            scores = base + gain + rng.normal(0, 0.01, len(PROMPTS))
            pairs = list(rng.integers(0, 2, 40).astype(float))
            rows.append({"label": label, "seed": seed, "oracle_score": float(scores.mean()),
                         "margin_accuracy": float(np.mean(pairs)),
                         "teacher_signal/oracle_gap_correlation": (rho if rho is not None else np.nan),
                         "items.oracle_score": dict(zip(PROMPTS, scores.tolist())), "items.margin_accuracy": pairs})
    return pd.DataFrame(rows)


def test_summary_orders_rows_and_measures_gains():
    summary = dial_summary(frame())
    assert list(summary["label"]) == ["dpo", "rho=1.00", "rho=0.50", "rho=0.00", "log_prob", "soft_value"]
    effects = dict(zip(summary["label"], summary["oracle_score.effect"]))
    assert effects["dpo"] is None
    assert abs(effects["rho=1.00"].estimate - 0.02) < 0.005 and effects["rho=1.00"].low > 0
    assert effects["rho=0.00"].low < 0 < effects["rho=0.00"].high


def test_table_and_figure_are_written(tmp_path):
    paths = write_teacher_signal_dial(frame(), tmp_path)
    assert set(paths) == {"md", "tex", "png", "pdf"}
    md = paths["md"].read_text()
    assert "dial ρ = 1.00" in md and "aux soft_value" in md and "Δ oracle vs DPO [95% CI]" in md
    assert "detection limit" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-"
    assert "\\begin{tabular}" in paths["tex"].read_text()
    assert "ρ(offset, oracle gap)" in format_dial(frame(), "markdown")
