"""Studies: expansion, a full (tiny) study with its tables, and resume after a kill mid-study."""

from __future__ import annotations

import pytest

import tvkd.training.trainer as trainer_mod
from studies import STUDIES
from studies.engine import run_study
from tests.report_checks import expand_study, load_study


def tiny_spec(world):
    return {
        "name": "tiny-study", "table": "reward_conflict", "seeds": [0, 1], "reference_variant": "soft_value",
        "base": {
            "models": {"student": world["student"], "teacher": world["teacher"]},
            "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 6,
                     "subsample": 0.75},
            "tokenize": {"max_length": 32, "max_prompt_length": 16},
            "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4},
            "cache": {"precompute": ["log_prob"]},
            "eval": {"max_new_tokens": 4},
        },
        "variants": [
            {"label": "dpo", "method": "dpo", "loss": {"name": "dpo"}},
            {"label": "soft_value", "method": "tvkd", "loss": {"name": "tvkd", "aux": "soft_value"}},
            {"label": "soft_value-shuffled", "method": "tvkd", "control": "shuffled",
             "loss": {"name": "tvkd", "aux": "soft_value", "control": "shuffled"}},
        ],
    }


def test_reward_conflict_study_is_registered_and_expands():
    assert "reward-conflict" in STUDIES
    spec = load_study("reward-conflict")
    runs = expand_study(spec)
    labels = {info["label"] for info, _ in runs} if runs and "label" in runs[0][0] else {c.name for _, c in runs}
    assert {"dpo", "logits", "log_prob", "max", "margin", "expectation", "soft_value", "soft_value-shuffled",
            "oracle-gap", "dpo-oracle-labels"} <= labels
    assert len(runs) == 10 * len(spec["seeds"]) and len(spec["seeds"]) >= 3
    quick = expand_study(spec, quick=True)
    assert len(quick) == 10 and quick[0][1].data.subsample < runs[0][1].data.subsample
    with pytest.raises(KeyError, match="did you mean|Did you mean"):
        load_study("reward-conflit")


def test_kill_mid_study_then_resume_without_retraining(tiny_world, tmp_path, monkeypatch):
    spec = tiny_spec(tiny_world)
    trained = []
    original = trainer_mod.PreferenceTrainer.train

    def counting_train(self, *a, **k):
        trained.append(self.args.output_dir)
        if len(trained) == 4:
            raise KeyboardInterrupt  # killed during the 4th run
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_mod.PreferenceTrainer, "train", counting_train)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, results=tmp_path / "results", progress=False)
    assert len(trained) == 4
    trained.clear()
    out = run_study(spec, results=tmp_path / "results", progress=False)
    assert len(trained) == 3  # only the killed run and the two never started
    frame = out["frame"]
    assert len(frame) == 6 and set(frame["seed"]) == {0, 1}
    assert out["tables"]["md"].exists() and out["tables"]["tex"].exists()
    md = out["tables"]["md"].read_text()
    assert "soft_value" in md and "DPO" in md
    trained.clear()
    run_study(spec, results=tmp_path / "results", progress=False)
    assert trained == []  # a finished study only rewrites its tables


def test_an_out_folder_that_cannot_be_made_stops_the_study_before_any_run(tiny_world, tmp_path):
    from studies.engine import run_study

    blocker = tmp_path / "tables.txt"
    blocker.write_text("a file where the tables would go")
    for out, message in ((blocker, "a file is there; give a folder"), (blocker / "sub", "cannot make that folder")):
        with pytest.raises(ValueError, match=message):
            run_study(tiny_spec(tiny_world), results=tmp_path / "results", out_dir=out, progress=False)
    assert not (tmp_path / "results").exists()  # nothing trained, nothing stored
