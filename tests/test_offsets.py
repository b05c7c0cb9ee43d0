"""TVKD offsets from any source: the teacher, the data (the oracle gap: a perfect teacher), the dial
between the oracle and its shuffle, and the std normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from tvkd.api import LOSSES, build_config
from tvkd.evaluation.metrics import spearman
from tvkd.losses.tvkd import OFFSET_COLUMN, cyclic_permutation, shuffled_order

N = 200


def _pairs(n=N, seed=0):
    rng = np.random.default_rng(seed)
    w, lo = rng.random(n), rng.random(n)
    meta = [json.dumps({"oracle_chosen": float(a), "oracle_rejected": float(b), "gap": float(a - b)})
            for a, b in zip(w, lo)]
    return Dataset.from_dict({"id": [str(i) for i in range(n)], "meta": meta}), w - lo


def _offsets(**opts):
    ds, gap = _pairs()
    cls = LOSSES.get("tvkd")
    out = cls().prepare(ds, build_config(cls, {"offset_source": "data:oracle_chosen,oracle_rejected", **opts}), seed=0)
    return np.asarray(out[OFFSET_COLUMN]), gap


def test_data_offsets_are_the_oracle_gap_and_need_no_teacher():
    got, gap = _offsets()
    np.testing.assert_array_equal(got, gap)  # rho = 1: the oracle offsets exactly
    cls = LOSSES.get("tvkd")
    cfg = build_config(cls, {"offset_source": "data:gap"})
    assert cls().needs(cfg).aux == () and cls().meta_keys(cfg) == ("gap",)
    ds, gap = _pairs()
    np.testing.assert_allclose(cls().prepare(ds, cfg, seed=0)[OFFSET_COLUMN], gap, rtol=0, atol=1e-15)


def test_dial_at_zero_signal_is_the_shuffled_control_exactly():
    full, gap = _offsets(control="shuffled", control_seed=3)
    np.testing.assert_array_equal(full, gap[cyclic_permutation(N, 3)])
    again, _ = _offsets(control="shuffled", control_seed=3, shuffle_fraction=1.0)
    np.testing.assert_array_equal(again, full)
    none, _ = _offsets(control="shuffled", control_seed=3, shuffle_fraction=0.0)
    np.testing.assert_array_equal(none, gap)


def test_dial_keeps_the_distribution_and_lowers_the_correlation():
    rhos = []
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        got, gap = _offsets(control="shuffled", shuffle_fraction=f)
        np.testing.assert_array_equal(np.sort(got), np.sort(gap))  # the same offsets, re-assigned
        rhos.append(spearman(got, gap))
    assert rhos[0] == pytest.approx(1.0) and abs(rhos[-1]) < 0.2
    assert all(a > b for a, b in zip(rhos, rhos[1:]))


def test_shuffled_order_moves_exactly_the_chosen_fraction():
    order = shuffled_order(100, 0.3, seed=1)
    assert (order != np.arange(100)).sum() == 30 and sorted(order) == list(range(100))


def test_std_norm_gives_unit_spread():
    got, gap = _offsets(offset_norm="std")
    assert got.std() == pytest.approx(1.0) and spearman(got, gap) == pytest.approx(1.0)


def test_bad_sources_name_the_option():
    cls = LOSSES.get("tvkd")
    with pytest.raises(ValueError, match="offset_source"):
        build_config(cls, {"offset_source": "oracle"})
    with pytest.raises(ValueError, match="offset_norm"):
        build_config(cls, {"offset_norm": "z"})


@pytest.mark.parametrize("source,problem", [("data:no_such_column", "has no such key"),
                                            ("data:label", "not a number")])
def test_a_missing_or_non_numeric_column_names_the_column_and_the_file(tiny_world, tmp_path, capsys, source,
                                                                       problem):
    from tests.test_trust import cli, run_dirs, write_cfg

    data = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in open(tiny_world["data"])]
    for r in rows:
        r["meta"]["label"] = "good"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = write_cfg(tmp_path / "run.yaml", {**tiny_world, "data": str(data)},
                    loss={"name": "tvkd", "offset_source": source})
    capsys.readouterr()
    code, _, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--quiet")
    column = source.split(":")[1]
    assert code == 2 and f"column {column!r}" in err and str(data) in err and problem in err
    assert not run_dirs(tmp_path / "results")
