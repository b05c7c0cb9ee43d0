"""On the testbed: TVKD γ = 1 with a DPO teacher of another vocabulary and template (`testbed:teacher_dpo_other_vocab`).

Its offsets equal those of the same teacher under the shared tokenizer (`testbed:teacher_dpo`) to 1e-5 (every testbed
text tokenizes alike under both: one word, one token); the run trains and evaluates; a KD baseline with that teacher
is one clear error. Builds the default testbed if it is not cached (a few minutes).
"""

from __future__ import annotations

import numpy as np
import pytest

from tvkd.assemble import assemble_training_set
from tvkd.config import config_from_dict
from tvkd.modeling import ModelSource
from tvkd.pipeline import InputError, execute, plan_run
from tvkd.results import ResultsStore


def cfg(teacher, loss=None):
    return config_from_dict({
        "name": "cross-tokenizer", "seed": 0,
        "models": {"student": "testbed:student_sft", "teacher": f"testbed:{teacher}"},
        "data": {"limit": 128, "test_limit": 32},
        "loss": loss or {"name": "tvkd", "aux": "soft_value", "gamma": 1.0},
        "train": {"num_train_epochs": 1, "per_device_train_batch_size": 16},
        "eval": {"teacher_scores": True, "value_alignment": 8, "max_new_tokens": 16},
    })


def offsets(teacher):
    plan = plan_run(cfg(teacher), progress=False, echo=lambda m: None)
    ts = assemble_training_set(plan.tokenized_train, plan.loss, plan.loss_cfg,
                               reference=ModelSource.from_path(plan.paths["reference"], dtype="float32"),
                               teacher=ModelSource.from_path(plan.paths["teacher"], dtype="float32"),
                               pad_id=plan.pad_id, teacher_vocab=plan.teacher_vocab,
                               teacher_tokens=plan.teacher_tokens, progress=False)
    return plan, ts


@pytest.mark.slow
def test_testbed_teacher_of_another_vocabulary(tmp_path):
    shared_plan, shared = offsets("teacher_dpo")
    other_plan, other = offsets("teacher_dpo_other_vocab")
    assert shared_plan.teacher_tokens is None and other_plan.teacher_tokens is not None
    assert other_plan.tokenizer.get_vocab() != other_plan.teacher_tokens.tokenizer.get_vocab()
    s, o = shared_plan.tokenized_train.dataset, other_plan.teacher_tokens.train.dataset
    alike = [i for i in range(len(s)) if [len(x) for x in (s[i]["chosen_ids"], s[i]["rejected_ids"])]
             == [len(x) for x in (o[i]["chosen_ids"], o[i]["rejected_ids"])]]
    assert len(alike) == len(s) == 128  # one word, one token under both
    a, b = np.asarray(shared.full["tvkd_offset"]), np.asarray(other.full["tvkd_offset"])
    assert np.abs(a).mean() > 1e-2
    np.testing.assert_allclose(b[alike], a[alike], atol=1e-5, rtol=0)

    rec = execute(cfg("teacher_dpo_other_vocab"), store=ResultsStore(tmp_path / "results"), progress=False)
    m = rec.metrics
    assert np.isfinite(m["train_loss"]) and 0 <= m["oracle_score"] <= 1 and "teacher_scores/shaping" in m
    assert "value_kl" not in m

    with pytest.raises(InputError, match="its tokenizer differs from the student's .* 'vanilla_kd' distils"):
        plan_run(cfg("teacher_dpo_other_vocab", {"name": "vanilla_kd"}), progress=False, echo=lambda m: None)
