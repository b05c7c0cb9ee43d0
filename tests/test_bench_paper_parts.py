"""`tvkd bench --shapes paper`: the teacher-cache part (four paths against the bare forward), the order
part (padded, bucketed, padding-free over DPO-MIX-like lengths) and where the results go."""

from __future__ import annotations

import json

import pytest

from tvkd.bench.paper import SHAPES, cache_pass_run, dpo_mix_lengths, order_run

TINY = SHAPES["tiny"]


def test_cache_part_measures_every_path_on_the_same_batches():
    res = cache_pass_run(TINY["teacher"], (2, 8, 24), device="cpu", dtype="float32", batches=1, topk=5, repeats=2)
    assert res["aux_columns"] == 6 and res["topk"] == 5 and res["repeats"] == 2
    for method in ("bare_forward", "reference", "onepass", "onepass_torch"):
        assert res[method]["seconds"] > 0 and res[method]["tokens_per_s"] > 0
    for method in ("reference", "onepass", "onepass_torch"):
        want = res["bare_forward"]["seconds"] / res[method]["seconds"]
        assert res[f"{method}_over_bare_forward"] == pytest.approx(want)


def test_order_part_bucketing_cuts_padding_on_the_same_pairs():
    lengths = dpo_mix_lengths(8, 40, 96)
    assert len(lengths) == 8 and all(2 <= c <= 96 and r <= c for _, c, r in lengths)
    runs = {name: order_run(TINY["student"], lengths, 2, opts, device="cpu", dtype="float32", chunk=16, warmup=0)
            for name, opts in {"padded": {}, "bucketed": {"length_buckets": True}}.items()}
    assert runs["padded"]["real_tokens"] == runs["bucketed"]["real_tokens"]  # every pair once, either order
    assert runs["bucketed"]["padded_tokens"] < runs["padded"]["padded_tokens"]
    assert runs["bucketed"]["padding_fraction"] < runs["padded"]["padding_fraction"]


def test_bench_writes_under_tvkd_results(tmp_path, monkeypatch):
    from tvkd.bench import bench_output
    from tvkd.bench.paper import main

    monkeypatch.setenv("TVKD_RESULTS", str(tmp_path / "res"))
    assert bench_output("bench.json") == tmp_path / "res" / "bench.json"
    assert main(device="cpu", shapes_name="tiny", rounds=1, parts=("cache",)) == 0
    res = json.loads((tmp_path / "res" / "bench-paper-tiny.json").read_text())
    assert res["teacher_cache"]["onepass_over_bare_forward"] > 0 and res["train"] == []
    with pytest.raises(ValueError, match="unknown bench part"):
        main(device="cpu", shapes_name="tiny", parts=("cache", "speed"))
