"""Teachers with another tokenizer: TVKD γ = 1 on the teacher's own tokenization, joined by id; refusals say why.

The other-vocabulary teacher (`tvkd.testbed.vocab.other_vocabulary`) is the same network behind renamed special
tokens, its own chat template and permuted ids, so every text tokenizes alike under both tokenizers and its
values of a text are the original teacher's: the offsets must equal the shared-tokenizer ones to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from tvkd.assemble import assemble_training_set
from tvkd.config import config_from_dict
from tvkd.modeling import ModelSource
from tvkd.pipeline import InputError, execute, plan_run
from tvkd.results import ResultsStore
from tvkd.testbed.vocab import other_vocabulary

OTHER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|eot|> ' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


@pytest.fixture
def world(tiny_world, tmp_path):
    other = other_vocabulary(tiny_world["teacher"], tmp_path / "teacher_other", template=OTHER_TEMPLATE)
    return {**tiny_world, "teacher_other": str(other)}


def cfg_for(world, teacher, loss=None, **eval_):
    return config_from_dict({
        "name": "x", "seed": 0,
        "models": {"student": world["student"], "teacher": world[teacher]},
        "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 8},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": loss or {"name": "tvkd", "aux": "soft_value"},
        "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4, "logging_steps": 2},
        "eval": {"max_new_tokens": 4, "value_alignment": 4, "teacher_scores": True, **eval_},
    })


def offsets(world, teacher, loss=None):
    plan = plan_run(cfg_for(world, teacher, loss), progress=False, echo=lambda m: None)
    src = ModelSource.from_path(plan.paths["teacher"], dtype="float32")
    ref = ModelSource.from_path(plan.paths["reference"], dtype="float32")
    ts = assemble_training_set(plan.tokenized_train, plan.loss, plan.loss_cfg, reference=ref, teacher=src,
                               pad_id=plan.pad_id, teacher_vocab=plan.teacher_vocab, teacher_tokens=plan.teacher_tokens,
                               progress=False)
    return plan, ts


@pytest.mark.parametrize("loss", [{"name": "tvkd", "aux": "soft_value"}, {"name": "tvkd", "aux": "max"},
                                  {"name": "tvkd", "aux": "soft_value", "terminal": "zero"}])
def test_tvkd_gamma_1_offsets_equal_the_shared_tokenizer_ones(world, loss):
    shared_plan, shared = offsets(world, "teacher", loss)
    other_plan, other = offsets(world, "teacher_other", loss)
    assert shared_plan.teacher_tokens is None and other_plan.teacher_tokens is not None
    tt = other_plan.teacher_tokens.train
    # the texts tokenize alike: same lengths, other ids, the teacher's own end-of-turn token
    s_ids, o_ids = shared_plan.tokenized_train.dataset, tt.dataset
    assert [len(x) for x in s_ids["chosen_ids"]] == [len(x) for x in o_ids["chosen_ids"]]
    assert list(s_ids["chosen_ids"]) != list(o_ids["chosen_ids"])
    assert list(other.full["id"]) == list(shared.full["id"])
    a, b = np.asarray(shared.full["tvkd_offset"]), np.asarray(other.full["tvkd_offset"])
    assert np.abs(a).max() > 1e-3 or loss.get("terminal") == "zero"
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_join_is_by_id_not_position(world):
    # the teacher's tokenization in reverse order: the joined columns still follow the student's pairs
    from tvkd.cross_tokenizer import join_by_id

    _, shared = offsets(world, "teacher")
    col = [c for c in shared.full.column_names if c.startswith("chosen/")][0]
    ids = list(shared.full["id"])
    rev = shared.full.select(range(len(ids) - 1, -1, -1))
    joined = join_by_id(rev.select_columns([col]), list(rev["id"]), ids)
    assert joined[col] == shared.full[col]


def test_a_tvkd_run_with_another_tokenizer_trains_and_evaluates(world, tmp_path):
    rec = execute(cfg_for(world, "teacher_other"), store=ResultsStore(tmp_path / "r"), progress=False)
    m = rec.metrics
    assert np.isfinite(m["train_loss"]) and "teacher_scores/sum_logprob" in m and "teacher_signal/abs_mean" in m
    assert "value_kl" not in m  # position-wise: skipped, with a line saying why
    shared = execute(cfg_for(world, "teacher"), store=ResultsStore(tmp_path / "s"), progress=False)
    for key in ("teacher_scores/sum_logprob", "teacher_scores/mean_logprob", "teacher_scores/shaping"):
        assert m[key] == pytest.approx(shared.metrics[key], abs=1e-6), key


def test_the_log_names_each_template_and_the_skipped_evaluator(world, tmp_path, capsys):
    execute(cfg_for(world, "teacher_other"), store=ResultsStore(tmp_path / "r"), progress=True)
    out = capsys.readouterr().out
    assert "chat template: student: its own, sha256" in out
    assert "teacher (another tokenizer): its own, sha256" in out
    assert "value_alignment: skipped (the teacher's tokenizer differs" in out


@pytest.mark.parametrize("loss, why", [
    ({"name": "vanilla_kd"}, "distils the teacher's top-"),
    ({"name": "gkd"}, "next-token distribution at every response position"),
    ({"name": "tvkd", "aux": "logits"}, "action aux reward 'logits'"),
    ({"name": "tvkd", "aux": "soft_value", "gamma": 0.9}, "gamma = 0.9"),
    ({"name": "tvkd", "aux": "soft_value", "shaping": "next_only"}, "shaping = 'next_only'"),
    ({"name": "seqkd"}, "teacher's rollouts"),
])
def test_token_level_losses_are_one_clear_error(world, loss, why):
    with pytest.raises(InputError) as e:
        plan_run(cfg_for(world, "teacher_other", loss), progress=False, echo=lambda m: None)
    msg = str(e.value)
    assert msg.startswith("models.teacher: its tokenizer differs from the student's") and why in msg
    assert "\n" not in msg


def test_plain_dpo_is_not_refused_for_a_teacher_it_never_reads(world, tmp_path):
    rec = execute(cfg_for(world, "teacher_other", {"name": "dpo"}), store=ResultsStore(tmp_path / "r"),
                  progress=False)
    assert np.isfinite(rec.metrics["train_loss"]) and "value_kl" not in rec.metrics
    # peak memory per stage and the tokenization counts are in metrics.json
    peaks = rec.metrics["peak_memory_mb"]
    assert set(peaks) >= {"caches", "train", "evaluate"} and all(p["rss_mb"] > 0 for p in peaks.values())
    assert rec.metrics["tokenize"]["response_tail"] == "trl"
    assert rec.metrics["tokenize"]["template_tail_kept"] == 0
