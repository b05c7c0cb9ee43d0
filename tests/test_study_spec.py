"""Study specs: axes expanded as a product with exclude / include rules, labels and columns, validation
errors that name the field, the shipped studies expanding exactly as before, and `plan_study`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from studies.plan import format_plan, plan_study
from studies.spec import STUDIES, STUDY_DIR, StudySpecError, load_spec, parse_spec
from tests.report_checks import expand_study
from tvkd.config import ConfigError, RunConfig, config_from_dict

EXAMPLE = STUDY_DIR / "examples" / "alpha_beta_grid.yaml"


def grid(**over):
    """A small valid grid (configs are only built here, never run)."""
    spec = {
        "name": "grid", "seeds": [0, 1],
        "base": {"models": {"student": "s", "teacher": "t"}, "data": {"source": "d.jsonl", "test_source": "d.jsonl"}},
        "axes": {
            "method": [{"label": "dpo", "loss": {"name": "dpo"}},
                       {"label": "tvkd", "family": "distill", "loss": {"name": "tvkd", "aux": "soft_value"}}],
            "loss.alpha": [0.5, 1.0],
            "loss.beta": [0.1, 0.3],
        },
        "exclude": [{"method": "dpo"}],
        "include": [{"method": "dpo", "loss.beta": [0.1, 0.3]}],
    }
    spec.update(over)
    return spec


def problems(spec, source="grid.yaml"):
    with pytest.raises(StudySpecError) as e:
        parse_spec(spec, source=source)
    return str(e.value)


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------


def test_axes_expand_as_a_product_minus_exclude_plus_include():
    runs = parse_spec(grid(), source="grid.yaml").runs()
    per_seed = ["method=tvkd,loss.alpha=0.5,loss.beta=0.1", "method=tvkd,loss.alpha=0.5,loss.beta=0.3",
                "method=tvkd,loss.alpha=1.0,loss.beta=0.1", "method=tvkd,loss.alpha=1.0,loss.beta=0.3",
                "method=dpo,loss.beta=0.1", "method=dpo,loss.beta=0.3"]
    assert [(r.seed, r.label) for r in runs] == [(s, label) for s in (0, 1) for label in per_seed]  # seed-major
    by_label = {r.label: r for r in runs if r.seed == 1}
    tvkd = by_label["method=tvkd,loss.alpha=1.0,loss.beta=0.3"]
    # the dotted keys land in the loss the named axis chose; the base is kept
    assert tvkd.config.loss.name == "tvkd"
    assert tvkd.config.loss.options == {"aux": "soft_value", "alpha": 1.0, "beta": 0.3}
    assert tvkd.config.models.teacher == "t" and tvkd.config.seed == 1 and tvkd.config.study == "grid"
    assert tvkd.config.name == tvkd.label
    assert tvkd.info == {"label": tvkd.label, "method": "tvkd", "loss.alpha": 1.0, "loss.beta": 0.3,
                         "family": "distill", "seed": 1}
    assert tvkd.axes == {"method": "tvkd", "loss.alpha": 1.0, "loss.beta": 0.3}
    dpo = by_label["method=dpo,loss.beta=0.3"]
    assert dpo.config.loss.name == "dpo" and dpo.config.loss.options == {"beta": 0.3}
    assert dpo.info["loss.alpha"] is None and dpo.axes["loss.alpha"] is None and "family" not in dpo.info
    # expand_study: the same runs, as (info, RunConfig)
    pairs = expand_study(grid())
    assert [(i, c) for i, c in pairs] == [(r.info, r.config) for r in runs]
    assert all(isinstance(c, RunConfig) for _, c in pairs)


def test_exclude_rules_match_on_every_axis_they_name_and_include_does_not_repeat():
    spec = grid(axes={"loss.alpha": [0.1, 0.5, 1.0], "loss.beta": [0.1, 0.2]},
                exclude=[{"loss.alpha": [0.5, 1.0], "loss.beta": 0.2}, {"loss.alpha": 0.1, "loss.beta": 0.1}],
                include=[{"loss.alpha": 0.5, "loss.beta": 0.1}, {"loss.alpha": 1.0, "loss.beta": 0.2}],
                base={"loss": {"name": "tvkd", "aux": "log_prob"}})
    labels = parse_spec(spec).labels()
    assert labels == ["loss.alpha=0.1,loss.beta=0.2", "loss.alpha=0.5,loss.beta=0.1", "loss.alpha=1.0,loss.beta=0.1",
                      "loss.alpha=1.0,loss.beta=0.2"]  # the first include was there already; the second is added back


def test_variants_times_axes_and_rules_naming_variants():
    spec = grid(
        variants=[{"label": "log_prob", "method": "tvkd", "loss": {"name": "tvkd", "aux": "log_prob"}},
                  {"label": "soft_value", "method": "tvkd", "loss": {"name": "tvkd", "aux": "soft_value"}}],
        axes={"loss.alpha": [0.5, 1.0], "data.subsample": [0.5, 1.0]},
        exclude=[{"variant": "log_prob", "data.subsample": 0.5}],
        include=[{"variant": "soft_value"}],  # the variant alone: the base's α and subsample
    )
    runs = parse_spec(spec).runs(seeds=[3])
    assert [r.label for r in runs] == [
        "log_prob,loss.alpha=0.5,data.subsample=1.0", "log_prob,loss.alpha=1.0,data.subsample=1.0",
        "soft_value,loss.alpha=0.5,data.subsample=0.5", "soft_value,loss.alpha=0.5,data.subsample=1.0",
        "soft_value,loss.alpha=1.0,data.subsample=0.5", "soft_value,loss.alpha=1.0,data.subsample=1.0",
        "soft_value"]
    first = runs[0]
    assert first.variant == "log_prob" and first.seed == 3
    assert first.info == {"label": first.label, "variant": "log_prob", "method": "tvkd", "loss.alpha": 0.5,
                          "data.subsample": 1.0, "seed": 3}
    assert first.config.loss.options == {"aux": "log_prob", "alpha": 0.5} and first.config.data.subsample == 1.0
    assert runs[-1].config.loss.options == {"aux": "soft_value"} and runs[-1].config.data.subsample is None


def test_quick_takes_its_seeds_base_and_a_subset_of_each_axis():
    spec = grid(quick={"seeds": [7], "axes": {"loss.alpha": [1.0], "method": "tvkd"},
                       "base": {"data": {"limit": 8}}})
    parsed = parse_spec(spec)
    quick = parsed.runs(quick=True)
    assert [(r.seed, r.label) for r in quick] == [(7, "method=tvkd,loss.alpha=1.0,loss.beta=0.1"),
                                                  (7, "method=tvkd,loss.alpha=1.0,loss.beta=0.3")]
    assert all(r.config.data.limit == 8 and r.config.study == "grid-quick" for r in quick)
    assert len(parsed.runs()) == 12 and parsed.runs()[0].config.data.limit is None


def test_other_run_config_keys_and_the_options_form_of_a_loss():
    spec = {"name": "keys", "base": {"loss": {"name": "tvkd", "options": {"aux": "max"}}},
            "axes": {"models.teacher": ["t1", "t2"], "data.source": ["a.jsonl"], "train.learning_rate": [1e-4],
                     "loss.alpha": [0.25], "testbed.label_temperature": [0.3], "num_threads": [1]}}
    runs = parse_spec(spec).runs()
    assert [r.config.models.teacher for r in runs] == ["t1", "t2"]
    cfg = runs[0].config
    assert cfg.data.source == "a.jsonl" and cfg.train.learning_rate == 1e-4 and cfg.num_threads == 1
    assert cfg.loss.options == {"aux": "max", "alpha": 0.25} and cfg.testbed == {"label_temperature": 0.3}
    assert runs[0].label == ("models.teacher=t1,data.source=a.jsonl,train.learning_rate=0.0001,loss.alpha=0.25,"
                             "testbed.label_temperature=0.3,num_threads=1")


# --------------------------------------------------------------------------------------------
# Validation: every problem names its field
# --------------------------------------------------------------------------------------------


def _set(spec, path, value):
    node = spec
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return spec


@pytest.mark.parametrize(("path", "value", "expected"), [
    (("axes", "loss.alpha"), [0.1, 0.5, "abc"], "study grid.yaml: axes.loss.alpha[2]: expected a number, got 'abc'"),
    (("axs",), {}, "study grid.yaml: axs: unknown key (did you mean 'axes'?)"),
    (("variants",), [{"label": "a"}, {"method": "dpo"}], "study grid.yaml: variants[1]: no label"),
    (("variants",), [{"label": "a"}, {"label": "a"}], "study grid.yaml: variants[1].label: 'a' repeats variants[0].label"),
    (("axes", "method", 1, "label"), "dpo", "study grid.yaml: axes.method[1].label: 'dpo' repeats axes.method[0].label"),
    (("axes", "flavour"), [1, 2], "study grid.yaml: axes.flavour: not a run-config key"),
    (("axes", "models.techer"), ["x"], "axes.models.techer: not a run-config key (did you mean 'models.teacher'?)"),
    (("axes", "loss.alpah"), [0.1], "axes.loss.alpah: not an option of any registered loss (did you mean 'loss.alpha'?)"),
    (("axes", "method"), [{"label": "dpo", "loss": {"name": "dpo"}}, {"loss": {"name": "ipo"}}],
     "axes.method[1]: a named axis's values are mappings with a label"),
    (("axes", "loss.beta"), [], "study grid.yaml: axes.loss.beta: empty"),
    (("axes",), {}, "study grid.yaml: axes: expected a non-empty mapping"),
    (("axes", "seed"), [1, 2], "axes.seed: seed is set by the study; list the seeds under `seeds`"),
    (("axes", "data.subsample"), [0.5, 1.5], "axes.data.subsample[1]: subsample must lie in (0, 1]"),
    (("axes", "loss.name"), ["tvkd", "tvdk"], "axes.loss.name[1]: unknown loss 'tvdk'"),
    (("axes", "loss.alpha"), [0.5, 0.5], "axes.loss.alpha[1]: 0.5 repeats axes.loss.alpha[0]"),
    (("exclude",), [{"methd": "dpo"}], "study grid.yaml: exclude[0].methd: not an axis of this study (did you mean 'method'?)"),
    (("exclude",), [{"method": "dpoo"}], "exclude[0].method: 'dpoo' is not a label of axes.method (dpo, tvkd)"),
    (("include",), [{"loss.alpha": 0.7}], "include[0].loss.alpha: 0.7 is not a value of axes.loss.alpha (0.5, 1.0)"),
    (("include",), [{"variant": "x"}], "include[0].variant: not an axis of this study"),
    (("exclude",), [], "loss 'dpo' has no option(s) 'alpha'"),
    (("base", "train"), {"learning_rate": -1}, "study grid.yaml: every run: train: learning_rate must be > 0"),
    (("base", "seed"), 3, "base.seed: set by the study"),
    (("seeds",), [0, "1"], "study grid.yaml: seeds[1]: expected an integer, got '1'"),
    (("quick",), {"seedz": [0]}, "quick.seedz: unknown key (did you mean 'seeds'?)"),
    (("quick",), {"axes": {"loss.alpha": [2.0]}}, "quick.axes.loss.alpha: 2.0 is not a value of axes.loss.alpha"),
    (("axes", "method", 1, "losss"), {"name": "tvkd"}, "axes.method[1].losss: not a run-config key (did you mean 'loss'?)"),
])
def test_validation_names_the_field(path, value, expected):
    message = problems(_set(grid(), path, value))
    assert expected in message, message


def test_a_combination_the_run_config_refuses_is_named_by_its_label():
    message = problems(grid(exclude=[], include=[]))
    assert "study grid.yaml: runs method=dpo,loss.alpha=0.5,loss.beta=0.1" in message
    assert "loss 'dpo' has no option(s) 'alpha'" in message and "exclude" in message
    assert message.count("\n") == 0  # one line for the 4 runs it stops


def test_several_problems_are_reported_together_and_are_config_errors():
    spec = grid(axs={}, seeds=[])
    spec["axes"]["loss.alpha"] = ["abc"]
    with pytest.raises(ConfigError) as e:  # the CLI prints a ConfigError (a ValueError) as one error line
        parse_spec(spec, source="grid.yaml")
    assert {"axs", "seeds", "axes.loss.alpha[0]"} <= {p.split(":")[0] for p in e.value.problems}


def test_a_spec_needs_a_name_and_variants_or_axes():
    assert "name: missing" in problems({"axes": {"loss.alpha": [0.5]}}, source="spec")
    assert "a study needs variants, axes or both" in problems({"name": "x"})
    # a file's stem names a study that has no name
    assert parse_spec({"axes": {"loss.beta": [0.5]}}, source="dir/my_grid.yaml").name == "my_grid"


def test_load_spec_names_the_file(tmp_path):
    path = tmp_path / "grid.yaml"
    spec = grid()
    spec["axes"]["loss.alpha"] = [0.1, 0.5, "abc"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudySpecError, match=rf"^study {path}: axes\.loss\.alpha\[2\]: expected a number, got 'abc'"):
        load_spec(str(path))
    path.write_text("name: [unclosed\n")
    with pytest.raises(StudySpecError, match="not valid YAML at line"):
        load_spec(str(path))


# --------------------------------------------------------------------------------------------
# The shipped studies expand exactly as before
# --------------------------------------------------------------------------------------------

OLD_RUN_KEYS = ("models", "data", "tokenize", "loss", "train", "cache", "eval", "eval_only", "num_threads", "testbed")


def _old_deep_merge(base, over):
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "loss":
            out[k] = _old_deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def old_expand_study(spec, *, seeds=None, quick=False):
    """The expansion of a variants-only study as it was before specs had axes (pins the shipped studies')."""
    base = spec.get("base", {})
    seeds_given = seeds is not None
    seeds = list(seeds if seeds_given else spec.get("seeds", [0]))
    if quick and spec.get("quick"):
        base = _old_deep_merge(base, spec["quick"].get("base", {}))
        if not seeds_given:
            seeds = list(spec["quick"].get("seeds", seeds))
    out = []
    for seed in seeds:
        for variant in spec["variants"]:
            over = {k: v for k, v in variant.items() if k in OLD_RUN_KEYS}
            cfg_dict = _old_deep_merge(base, over)
            cfg_dict.update(name=variant["label"], seed=seed, study=spec["name"] + ("-quick" if quick else ""))
            info = {k: v for k, v in variant.items() if k not in over}
            info["seed"] = seed
            out.append((info, config_from_dict(cfg_dict, where=f"study {spec['name']} variant {variant['label']}")))
    return out


SHIPPED = sorted(STUDY_DIR.glob("*.yaml"))


def test_every_shipped_study_is_registered():
    assert SHIPPED and {yaml.safe_load(p.read_text())["name"] for p in SHIPPED} == set(STUDIES.names())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize(("seeds", "quick"), [(None, False), (None, True), ([5], False)])
def test_shipped_studies_validate_and_expand_as_before(path, seeds, quick):
    raw = yaml.safe_load(path.read_text())
    spec = load_spec(str(path))
    assert spec.name == raw["name"]
    if spec.axes or (quick and (raw.get("quick") or {}).get("axes")):
        # a grid: no variants-only expansion to compare with; every run is distinct and named after its values
        runs = spec.runs(seeds=seeds, quick=quick)
        keys = [(r.seed, r.label) for r in runs]
        assert runs and len(set(keys)) == len(keys)
        wanted = seeds or (quick and (raw.get("quick") or {}).get("seeds")) or raw.get("seeds", [0])
        assert {r.seed for r in runs} == set(wanted)
        return
    new = expand_study(raw, seeds=seeds, quick=quick)
    old = old_expand_study(raw, seeds=seeds, quick=quick)
    assert [(i, c.to_dict()) for i, c in new] == [(i, c.to_dict()) for i, c in old]
    assert [(c.seed, c.name) for _, c in new] == [(c.seed, c.name) for _, c in old]
    registered = load_spec(raw["name"])
    assert registered.source == path.name and [r.label for r in registered.runs()] == [r.label for r in spec.runs()]


def test_the_example_grid_validates_and_is_not_a_paper_study():
    first = EXAMPLE.read_text().splitlines()[0]
    assert first.startswith(f"# tvkd study run studies/examples/{EXAMPLE.name}")
    spec = load_spec(str(EXAMPLE))
    assert spec.name not in STUDIES and EXAMPLE.parent != STUDY_DIR
    assert [a.name for a in spec.axes] == ["teacher", "method", "loss.alpha", "loss.beta"]
    assert spec.exclude and spec.include
    runs = spec.runs()
    assert len(runs) == 2 * (2 * 2 * 2 + 2) and {r.seed for r in runs} == {0, 1}
    assert {r.config.models.teacher for r in runs} == {"testbed:teacher_dpo", "testbed:teacher_sft"}
    assert spec.reference_variant in {r.label for r in runs}
    assert len(spec.runs(quick=True)) == 2 * 2 + 2


# --------------------------------------------------------------------------------------------
# plan_study on a tiny results store
# --------------------------------------------------------------------------------------------


def tiny_grid(world):
    return {
        "name": "tiny-grid", "seeds": [0],
        "base": {
            "models": {"student": world["student"], "teacher": world["teacher"]},
            "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 4},
            "tokenize": {"max_length": 32, "max_prompt_length": 16},
            "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4},
            "eval": {"max_new_tokens": 2, "teacher_scores": False},
            "loss": {"name": "dpo"},
        },
        "axes": {"loss.beta": [0.1, 0.2]},
    }


def test_plan_study_counts_complete_runs_and_estimates_the_rest(tiny_world, tmp_path):
    from tvkd.pipeline import execute
    from tvkd.results import ResultsStore

    spec = tiny_grid(tiny_world)
    results = tmp_path / "results"
    before = plan_study(spec, results)
    assert [r.label for r in before.runs] == ["loss.beta=0.1", "loss.beta=0.2"]
    assert len(before.complete) == 0 and len(before.to_run) == 2 and before.unknown == 2
    assert "remaining time: unknown" in format_plan(before)

    first = before.runs[0].config
    record = execute(first, store=ResultsStore(results), progress=False)
    measured = record.status["duration_s"]

    plan = plan_study(spec, results)
    assert [r.state for r in plan.runs] == ["complete", "missing"]
    done, todo = plan.runs
    assert done.complete and done.duration_s == measured and done.run_dir == Path(record.run_dir)
    assert todo.estimate_s == pytest.approx(measured) and todo.basis == "study"  # no run of its own label yet
    assert plan.remaining_s == pytest.approx(measured) and plan.unknown == 0
    text = format_plan(plan)
    assert "1 complete, 1 to run" in text and "remaining time: ~" in text
    assert "mean of all 1 complete run(s) of the study" in text
    assert "loss.beta" in text.splitlines()[2] and "0.2" in text and "to run" in text
    assert plan.to_dict()["complete"] == 1

    # a second seed of a complete label is estimated from that label's own runs
    again = plan_study(spec, results, seeds=[0, 1])
    assert [(r.seed, r.state, r.basis) for r in again.runs] == [
        (0, "complete", None), (0, "missing", "study"), (1, "missing", "label"), (1, "missing", "study")]
    # --quick runs live in their own study folder: nothing of them is complete
    assert len(plan_study(spec, results, quick=True).complete) == 0


def test_the_engine_checks_the_table_name_before_any_run():
    """The format knows nothing of reports; `studies.engine.load` checks ``table`` against the generators."""
    from studies.engine import load

    spec = _set(grid(), ("table",), "main_tabel")
    parse_spec(spec, "grid.yaml")  # the format alone accepts any string
    with pytest.raises(StudySpecError) as e:
        load(spec)
    assert "table: unknown table 'main_tabel'" in str(e.value) and "Did you mean 'main_table'?" in str(e.value)


def test_a_reference_variant_that_names_no_run_is_an_error():
    spec = {**grid(), "reference_variant": "dpoo"}
    assert parse_spec({**grid(), "reference_variant": "method=dpo,loss.beta=0.1"}).reference_variant
    message = problems(spec)
    assert "reference_variant: 'dpoo' is not the label of any run of this study" in message, message
    assert "method=dpo,loss.beta=0.1" in message


def test_resources_are_checked_like_run_config_keys():
    assert parse_spec({**grid(), "resources": {"cpu": 2, "gpu": 0.5}}).resources.as_tune() == {"cpu": 2.0, "gpu": 0.5}
    assert parse_spec(grid()).resources.as_tune() == {"cpu": 1.0, "gpu": 0.0}
    assert "resources.gpus: unknown key; valid keys: cpu, gpu. Did you mean 'gpu'?" in problems(
        {**grid(), "resources": {"gpus": 1}})
    assert "resources: cpu must be > 0" in problems({**grid(), "resources": {"cpu": 0}})
    assert "resources.cpu: expected a number, got 'two'" in problems({**grid(), "resources": {"cpu": "two"}})


def test_top_level_types_are_checked_one_error_per_field():
    message = problems({**grid(), "description": 3, "seeds": "0", "axes": [1]})
    assert "description: expected a string, got 3" in message
    assert "seeds: expected a list, got '0'" in message
    assert "axes: expected a mapping, got [1]" in message
    assert "not an axis" not in message and "needs variants" not in message  # one error per field, no echoes


def test_a_profile_is_parsed_once():
    """Loading a spec with a profile parses the spec and each of its profiles once (not again for the profile)."""
    from unittest import mock

    import studies.spec as spec_module

    raw = {**grid(), "profiles": {"paper": {"seeds": [3]}}}
    calls = []
    real = spec_module.StudyFile._check_runs

    def counting(self):
        calls.append(self.name)
        return real(self)

    with mock.patch.object(spec_module.StudyFile, "_check_runs", counting):
        out = parse_spec(raw, profile="paper")
    assert out.name == "grid-paper" and [r.seed for r in out.runs()][:1] == [3]
    assert sorted(calls) == ["grid", "grid-paper"]


def test_a_study_file_reads_scientific_notation_as_numbers(tmp_path):
    path = tmp_path / "sci.yaml"
    path.write_text("name: sci\nbase: {train: {learning_rate: 5e-07}}\nvariants: [{label: a, loss: {name: dpo}}]\n"
                    "axes: {loss.beta: [1e-2, 1e-1]}\n")
    spec = load_spec(path)
    assert spec.runs()[0].config.train.learning_rate == 5e-07
    assert [r.config.loss.options["beta"] for r in spec.runs()] == [0.01, 0.1]


def test_a_missing_study_file_is_named_as_a_missing_file(tmp_path):
    with pytest.raises(StudySpecError, match="nothere.yaml: file not found"):
        load_spec(tmp_path / "nothere.yaml")
