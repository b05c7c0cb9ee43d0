"""The default testbed over three seeds: DPO teacher > SFT teacher > SFT student in mean oracle score.

Run with ``pytest -m slow tests/test_testbed_slow.py -s`` (about 2.5 minutes per seed on one
CPU thread); the per-seed table is printed. Each seed changes the data, the inits, the data
order, the on-policy samples and the labels, not only the initialisation.
"""

from __future__ import annotations

import statistics

import pytest

from tvkd.testbed import STAGES, TestbedConfig, build_testbed

SEEDS = (0, 1, 2)
MODELS = ("teacher_sft", "teacher_dpo", "student_sft", "student_dpo")


@pytest.mark.slow
def test_default_testbed_ordering_over_seeds(tmp_path_factory):
    reports = []
    for seed in SEEDS:
        tb = build_testbed(
            TestbedConfig(seed=seed), cache_dir=tmp_path_factory.mktemp(f"seed{seed}"), progress=False
        )
        reports.append(tb.report)
        assert not any(tb.report["stages"][s]["cached"] for s in STAGES)
        assert tb.report["build_wall_s"] < 300, (
            f"seed {seed}: the default build took {tb.report['build_wall_s']}s"
        )

    print("\nseed " + " ".join(f"{m:>12}" for m in MODELS) + "  label_noise(t/s)  wall_s")
    for seed, r in zip(SEEDS, reports):
        cells = " ".join(f"{r['oracle'][m]:.3f}/{r['exact_match'][m]:.3f}" for m in MODELS)
        noise = r["label_noise"]
        print(
            f"{seed:>4} {cells}  {noise['teacher_pairs']:.3f}/{noise['student_pairs']:.3f}  {r['build_wall_s']:.0f}"
        )
    mean = {m: statistics.mean(r["oracle"][m] for r in reports) for m in MODELS}
    spread = {m: statistics.pstdev(r["oracle"][m] for r in reports) for m in MODELS}
    print("mean " + " ".join(f"{mean[m]:.3f}±{spread[m]:.3f}" for m in MODELS))

    assert mean["teacher_dpo"] > mean["teacher_sft"] > mean["student_sft"]
    # the teacher's DPO stage must help on every seed, not only on average
    assert all(r["teacher_dpo_gain"] > 0 for r in reports), [r["teacher_dpo_gain"] for r in reports]
