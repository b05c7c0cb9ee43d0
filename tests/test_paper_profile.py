"""The paper profile: `profiles:` blocks merged over a study spec, checked like the spec, and
`tvkd study plan --profile paper` listing the paper's runs with a GPU-hours estimate, offline."""

from __future__ import annotations

import copy
import math
import re

import pytest
import yaml

from reports.paper_compute import MFU, MODELS, PEAK_FLOPS, model_parameters
from studies.spec import STUDY_DIR, StudySpecError, apply_profile, load_spec, parse_spec
from tvkd.cli import main


def raw(name: str) -> dict:
    return yaml.safe_load((STUDY_DIR / f"{name}.yaml").read_text())


def test_main_table_paper_profile_is_the_papers_setting():
    spec = load_spec("main-table", "paper")
    assert spec.name == "main-table-paper" and spec.profile == "paper" and spec.base_name == "main-table"
    assert spec.study_name(quick=True) == "main-table-paper-quick"
    runs = spec.runs()
    testbed = load_spec("main-table").runs(seeds=[0])
    assert [r.label for r in runs] == [r.label for r in testbed]  # the same table, other models and data
    for r in runs:
        cfg = r.config
        assert cfg.study == "main-table-paper" and cfg.seed == 0
        assert cfg.data.source == "argilla/dpo-mix-7k" and cfg.data.test_source is None
        assert cfg.data.subsample is None and cfg.train.learning_rate == 5e-7
        assert cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps == 128
        assert not any(str(v).startswith("testbed:") for v in vars(cfg.models).values())
    by = {r.label: r.config for r in runs}
    assert by["teacher_dpo"].models.student == "meta-llama/Llama-3.1-8B" and by["teacher_dpo"].eval_only
    assert by["tvkd"].loss.options == {"aux": "soft_value", "alpha": 0.7, "value_temperature": 2.0}
    for label in ("vanilla_kd", "dckd", "adpa", "tvkd_released"):
        assert by[label].loss.options["topk"] == 50  # the paper's top-50 teacher cache
    assert by["sft"].models.student == "meta-llama/Llama-3.2-1B"
    helpsteer = load_spec("main-table", "paper-helpsteer2")
    assert {r.config.data.source for r in helpsteer.runs()} == {"nvidia/HelpSteer2"}


def test_reward_conflict_paper_profile_replaces_the_variants():
    spec = load_spec("reward-conflict", "paper")
    labels = [r.label for r in spec.runs()]
    assert labels == ["dpo", "logits", "log_prob", "max", "margin", "expectation", "soft_value",
                      "soft_value-shuffled"]  # no oracle-gap: it needs the testbed's oracle
    assert load_spec("reward-conflict").profiles == ("paper",)


def test_merge_rules():
    spec = {"name": "s", "seeds": [0, 1], "base": {"train": {"learning_rate": 1e-5, "num_train_epochs": 2}},
            "variants": [{"label": "a", "loss": {"name": "dpo", "beta": 0.1}}, {"label": "b", "loss": {"name": "simpo"}}],
            "axes": {"loss.beta": [0.1, 0.2]},
            "exclude": [{"variant": "b", "loss.beta": 0.2}],
            "profiles": {"p": {"seeds": [7], "base": {"train": {"learning_rate": 2e-5}},
                               "variants": {"a": {"loss": {"name": "dpo"}}}, "axes": {"loss.beta": [0.5]},
                               "exclude": []}}}
    before = copy.deepcopy(spec)
    merged = apply_profile(spec, "p")
    assert spec == before  # the spec itself is untouched
    assert merged["name"] == "s-p" and "profiles" not in merged and merged["seeds"] == [7]
    assert merged["base"]["train"] == {"learning_rate": 2e-5, "num_train_epochs": 2}  # deep-merged
    assert merged["variants"][0]["loss"] == {"name": "dpo"}  # loss replaced whole, as in deep_merge
    assert merged["variants"][1] == spec["variants"][1]
    assert merged["axes"] == {"loss.beta": [0.5]} and merged["exclude"] == []
    parsed = parse_spec(spec, profile="p")
    assert [(r.label, r.seed) for r in parsed.runs()] == [("a,loss.beta=0.5", 7), ("b,loss.beta=0.5", 7)]
    assert parsed.runs()[0].config.study == "s-p"
    with pytest.raises(KeyError, match="no profile 'q'.*it has p"):
        parse_spec(spec, profile="q")


@pytest.mark.parametrize(("block", "message"), [
    ({"bogus": 1}, r"profiles\.paper\.bogus: not a key a profile may set"),
    ({"base": {"train": {"learning_rate": -1.0}}}, r"profiles\.paper: .*learning_rate must be > 0"),
    ({"variants": {"nope": {"loss": {"name": "dpo"}}}}, r"profiles\.paper\.variants\.nope: not a variant label"),
    ({"base": {"modles": {}}}, r"profiles\.paper: base\.modles: not a run-config key \(did you mean 'models'\?\)"),
    ({"seeds": []}, r"profiles\.paper: seeds: expected a non-empty list"),
    ({"axes": [1]}, r"profiles\.paper\.axes: expected a mapping"),
])
def test_a_bad_profile_is_named_before_anything_runs(block, message):
    spec = raw("reward_conflict")
    spec["profiles"] = {"paper": block}
    with pytest.raises(StudySpecError, match=message):
        parse_spec(spec, source="reward_conflict.yaml", profile="paper")
    if "variants" not in block:  # checked with the spec itself too, before any profile is asked for
        with pytest.raises(StudySpecError, match=message):
            parse_spec(spec, source="reward_conflict.yaml")


def test_a_spec_with_fewer_variants_keeps_its_other_profiles_usable():
    spec = raw("main_table")
    spec["variants"] = [v for v in spec["variants"] if v["label"] in ("dpo", "tvkd")]
    with pytest.raises(StudySpecError, match=r"reference_variant: 'adpa' is not the label of any run"):
        parse_spec(spec)  # the reference went with the dropped variants
    spec["reference_variant"] = "dpo"
    assert [r.label for r in parse_spec(spec).runs()] == ["dpo", "tvkd"] * 3
    with pytest.raises(StudySpecError, match=r"profiles\.paper\.variants\.teacher_dpo: not a variant label"):
        parse_spec(spec, profile="paper")  # asked for, its overrides of the dropped variants are named


def test_published_parameter_counts():
    # the sizes the models' cards state: 1.24B, 3.21B, 8.03B, 7.24B, 514M
    published = {"meta-llama/Llama-3.2-1B": 1.24e9, "meta-llama/Llama-3.2-3B": 3.21e9,
                 "meta-llama/Llama-3.1-8B": 8.03e9, "mistralai/Mistral-7B-v0.2": 7.24e9,
                 "h2oai/h2o-danube3-500m-base": 514e6}
    for hub_id, size in published.items():
        assert model_parameters(hub_id) == pytest.approx(size, rel=0.005), hub_id
    assert len(MODELS) >= 5 and model_parameters("someone/unknown-model") is None


def test_plan_paper_main_table_offline_without_loading_a_model(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model or data set was loaded: {args[:1]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    rc = main(["study", "plan", "--profile", "paper", "main-table", "--results", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "study main-table-paper" in out and "16 runs" in out and "0 complete, 16 to run" in out
    total = float(re.search(r"total: ~([\d,.]+) GPU-hours for 16 run\(s\)", out).group(1).replace(",", ""))
    assert 0 < total < math.inf
    assert "989 TFLOP/s" in out and "40% MFU" in out and "6·N_student·tokens·epochs" in out

    # the dpo row, computed independently: its training, the reference pass it is the first to need, and
    # its evaluation (student + reference on the 750 test pairs, greedy generations of 512 tokens)
    n = 16 * (2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 128256 * 2048
    tokens, test_tokens = 6750 * 2 * 600, 750 * 2 * 600
    flops = 6 * n * tokens * 2 + 2 * n * tokens + 2 * 2 * n * test_tokens + 2 * n * 750 * 512
    row = re.search(r"^\s+dpo\s+0\s+1\.24B\s+-\s+8\.10M\s+2\s+([\d,.]+)\s+([\d.]+)$", out, re.M)
    assert row, out
    assert float(row.group(1).replace(",", "")) == pytest.approx(flops / 1e15, abs=0.05)
    assert float(row.group(2)) == pytest.approx(flops / (PEAK_FLOPS * MFU) / 3600, rel=0.01)


def test_plan_with_an_unknown_profile_is_one_error_line(tmp_path, capsys):
    rc = main(["study", "plan", "--profile", "papr", "main-table", "--results", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "no profile 'papr'" in err and "did you mean 'paper'" in err


#: The paper's judge for MT-Bench and AlpacaEval, dated (Sec. 4.1, line 171; footnote 4, line 179).
PAPER_JUDGE = "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize("path", sorted(STUDY_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_paper_profile_scored_by_an_llm_judge_names_the_papers_dated_judge(path):
    """Every study whose paper profile ends in MT-Bench or AlpacaEval says which judge the paper used, dated: the
    config has no judge key, so its comment names the model and the `--option judge_model=` that runs it."""
    text = path.read_text()
    raw = yaml.safe_load(text)
    if "paper" not in (raw.get("profiles") or {}) or not re.search(r"mt-bench|alpaca", text, re.IGNORECASE):
        return
    assert f"judge_model={PAPER_JUDGE}" in text, f"{path.name}: its paper profile does not name the judge {PAPER_JUDGE}"
    assert "Sec. 4.1" in text and "single-turn" in text  # where the paper says so, and what it scores
    undated = [m.start() for m in re.finditer(r"gpt-4o-mini(?!-2024-07-18)", text)]
    assert not undated, f"{path.name}: an undated gpt-4o-mini"


def test_no_paper_profile_run_names_a_testbed_part():
    """A paper profile is the paper's setting by hub id: a `testbed:` part left over from the base (e.g. the DPO row's
    unused teacher) would build the embedded testbed just to plan it."""
    from studies.spec import STUDIES, load_spec

    left = []
    for name in STUDIES.names():
        if "paper" not in (load_spec(name).raw.get("profiles") or {}):
            continue
        for run in load_spec(name, profile="paper").runs():
            m, d = run.config.models, run.config.data
            values = (m.student, m.teacher, m.reference, m.teacher_reference, d.source, d.test_source)
            left += [(name, run.label, v) for v in values if isinstance(v, str) and v.startswith("testbed:")]
    assert left == []
