"""`tvkd eval`: benchmarks on a finished run, metrics merged into its store without losing what was there."""

from __future__ import annotations

import json

from tests.test_trust import cli, run_dirs, write_cfg


def test_eval_merges_analysis_metrics_into_a_run(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, loss={"name": "tvkd", "aux": "soft_value"},
                    **{"train.save_model": True})
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    before = json.loads((run / "metrics.json").read_text())
    code, out, err = cli(capsys, "eval", run, "--bench", "margin,value-kl", "--option", "n=6", "--results", results,
                         "--quiet")
    assert code == 0, err
    after = json.loads((run / "metrics.json").read_text())
    assert {k: after[k] for k in before if k != "margin_accuracy"} == {k: v for k, v in before.items()
                                                                       if k != "margin_accuracy"}
    assert after["margin_accuracy"] == before["margin_accuracy"]  # the same model, the same pairs
    assert "value_kl" in after and "policy_kl" in after and "metrics merged" in out


def test_eval_refuses_a_run_without_weights_and_unknown_benchmarks(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    code, _, err = cli(capsys, "eval", run, "--bench", "mt-bnch", "--results", results)
    assert code == 2 and "unknown benchmark 'mt-bnch'" in err
    code, _, err = cli(capsys, "eval", run, "--bench", "margin", "--results", results)
    assert code == 2 and "kept no weights" in err and "save_model=true" in err
