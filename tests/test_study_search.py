"""Hyperparameter search (studies/search.py): a search on the tiny world, kill and resume, pruning."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

import studies.search as search_mod
import tvkd.training.trainer as trainer_mod
from studies.search import PruningCallback, log_value, parse_search_spec, search_study, trial_config
from tvkd.api import ConfigError
from tvkd.config import config_from_dict, load_config
from tvkd.results import ResultsStore, RunRecord

ROOT = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def tiny_search(world, name="tiny-alpha", n_trials=8, **search):
    return {
        "name": name,
        "base": {
            "num_threads": 1,
            "models": {"student": world["student"], "teacher": world["teacher"]},
            "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 6},
            "tokenize": {"max_length": 32, "max_prompt_length": 16},
            "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4,
                      "logging_steps": 1},
            "loss": {"name": "tvkd", "aux": "log_prob", "alpha": 0.5},
            "eval": {"max_new_tokens": 4, "teacher_scores": False},
        },
        "search": {
            "params": {"loss.alpha": {"low": 0.05, "high": 2.0, "log": True}},
            "metric": "margin_accuracy", "direction": "maximize", "n_trials": n_trials,
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 2},
            "intermediate": "train/loss",
            **search,
        },
    }


def sqlite(tmp_path, name="search"):
    return f"sqlite:///{tmp_path / f'{name}.db'}"


def finished(url, name):
    study = optuna.load_study(study_name=name, storage=url)
    return study.get_trials(deepcopy=False, states=FINISHED)


# --------------------------------------------------------------------------------------------
# (a) a search completes and writes a best.yaml that `tvkd run` accepts
# --------------------------------------------------------------------------------------------


def test_search_over_alpha_completes_and_writes_a_loadable_best_config(tiny_world, tmp_path, capsys):
    from tvkd.pipeline import identity

    url, results = sqlite(tmp_path), tmp_path / "results"
    out = search_study(tiny_search(tiny_world), storage=url, results=results, progress=True)
    printed = capsys.readouterr().out
    assert "[8/8]" in printed and "margin_accuracy=" in printed

    states = [t["state"] for t in out["trials"]]
    assert len(out["trials"]) == 8 and set(states) <= {"complete", "pruned"}
    assert len(finished(url, "tiny-alpha")) == 8
    for t in out["trials"]:
        assert t["run_name"] == f"tiny-alpha-trial{t['number']}" and 0.05 <= t["params"]["loss.alpha"] <= 2.0
        rec = RunRecord.read(Path(t["run_dir"]))
        assert rec.state == ("complete" if t["state"] == "complete" else "failed")
        if t["state"] == "complete":
            assert t["value"] == rec.metrics["margin_accuracy"]

    path = out["best_config_path"]
    assert path == results / "tiny-alpha" / "best.yaml"
    first = path.read_text().splitlines()[0]
    assert first == f"# tvkd run {path} --results {results}"
    cfg = load_config(path)
    assert cfg.loss.options["alpha"] == out["best_params"]["loss.alpha"]
    assert cfg.loss.options["aux"] == "log_prob" and cfg.study == "tiny-alpha"
    assert out["best_value"] == max(t["value"] for t in out["trials"] if t["state"] == "complete")
    # as written it is the best trial's own config: `tvkd run best.yaml` finds that run, trains nothing
    assert ResultsStore(results).is_complete(identity(cfg), study=cfg.study, name=cfg.name)


# --------------------------------------------------------------------------------------------
# (b) kill -9 mid-search, then resume from the storage
# --------------------------------------------------------------------------------------------


def test_killed_search_resumes_from_its_storage_without_rerunning_finished_trials(tiny_world, tmp_path,
                                                                                  monkeypatch):
    spec_path = tmp_path / "search.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_search(tiny_world)))
    url, results = sqlite(tmp_path), tmp_path / "results"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "studies.search", str(spec_path), "--storage", url,
                             "--results", str(results), "--quiet"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # two trials finished and the third one running: kill it mid-trial
                study = optuna.load_study(study_name="tiny-alpha", storage=url)
                if len(study.get_trials(states=FINISHED)) >= 2 and study.get_trials(states=(TrialState.RUNNING,)):
                    break
            except (KeyError, ValueError, optuna.exceptions.StorageInternalError):
                pass  # the study is not created yet
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed = [t.number for t in optuna.load_study(study_name="tiny-alpha", storage=url).get_trials(
        states=(TrialState.RUNNING,))]

    before = {}
    for t in finished(url, "tiny-alpha"):
        run_dir = Path(t.user_attrs["run_dir"])
        metrics = run_dir / "metrics.json"
        before[t.number] = (t.state, t.value, run_dir,
                            (metrics.read_bytes(), metrics.stat().st_mtime_ns) if metrics.exists() else None)
    assert 2 <= len(before) < 8

    trained = []
    original = trainer_mod.PreferenceTrainer.train

    def counting_train(self, *a, **k):
        trained.append(Path(self.args.output_dir).parent)
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_mod.PreferenceTrainer, "train", counting_train)
    monkeypatch.setattr(search_mod, "ORPHAN_GRACE", 3)  # the kill may land between `ask` and the owner mark
    out = search_study(spec_path, storage=url, results=results, progress=False)

    study = optuna.load_study(study_name="tiny-alpha", storage=url)
    assert len(study.get_trials(states=FINISHED)) == 8
    assert study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)) == []
    assert len(trained) <= 8 - len(before)
    for number, (state, value, run_dir, metrics) in before.items():
        t = study.trials[number]
        assert (t.state, t.value) == (state, value)
        assert run_dir not in trained
        if metrics is not None:
            path = run_dir / "metrics.json"
            assert (path.read_bytes(), path.stat().st_mtime_ns) == metrics
    # a trial the kill caught mid-run is failed and queued again: same params, same run (name);
    # one caught inside `ask`, before it had params, is failed and a fresh trial takes its place
    assert [t.number for t in study.get_trials(states=(TrialState.FAIL,))] == killed
    for t in study.get_trials(states=(TrialState.FAIL,)):
        retry = [r for r in study.trials if r.user_attrs.get("tvkd:retry_of") == t.number]
        if t.params:
            assert len(retry) == 1 and retry[0].params == t.params
        else:
            assert retry == [] and "run_name" not in t.user_attrs
        assert retry[0].user_attrs["run_name"] == t.user_attrs["run_name"] and retry[0].state in FINISHED
    assert out["best_config_path"].is_file()


def test_ctrl_c_mid_trial_queues_that_trial_again_for_the_resume(tiny_world, tmp_path, monkeypatch):
    url, results = sqlite(tmp_path), tmp_path / "results"
    spec = tiny_search(tiny_world, name="ctrl-c", n_trials=2, pruner="none", intermediate=None)
    trained = []
    original = trainer_mod.PreferenceTrainer.train

    def interrupted_second(self, *a, **k):
        trained.append(Path(self.args.output_dir).parent)
        if len(trained) == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_mod.PreferenceTrainer, "train", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        search_study(spec, storage=url, results=results, progress=False)
    assert RunRecord.read(trained[1]).state == "interrupted"
    out = search_study(spec, storage=url, results=results, progress=False)
    assert [t["state"] for t in out["trials"]] == ["complete", "fail", "complete"]
    assert out["trials"][2]["params"] == out["trials"][1]["params"]
    assert out["trials"][2]["run_name"] == out["trials"][1]["run_name"] == "ctrl-c-trial1"
    assert trained[2] == trained[1] and RunRecord.read(trained[1]).state == "complete"


# --------------------------------------------------------------------------------------------
# (c) pruning: the callback raises TrialPruned; the run is not recorded as complete
# --------------------------------------------------------------------------------------------


class FakeTrial:
    number = 3

    def __init__(self, prune_above):
        self.reports, self.prune_above = [], prune_above

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.reports[-1][1] > self.prune_above


class _State:
    def __init__(self, step):
        self.global_step = step


def test_pruning_callback_reports_each_log_and_raises_trial_pruned_on_a_bad_value():
    assert log_value({"loss": 0.5}, "train/loss") == 0.5 and log_value({"train/loss": 2}, "loss") == 2.0
    assert log_value({"train_runtime": 1.0}, "train/loss") is None and log_value(None, "loss") is None
    trial = FakeTrial(prune_above=1.0)
    cb = PruningCallback(trial, "train/loss")
    cb.on_log(None, _State(1), None, logs={"loss": 0.7, "epoch": 0.1})
    cb.on_log(None, _State(1), None, logs={"train_runtime": 3.0})  # no loss: nothing reported
    with pytest.raises(optuna.TrialPruned, match="step 2: train/loss=5"):
        cb.on_log(None, _State(2), None, logs={"loss": 5.0})
    assert trial.reports == [(1, 0.7), (2, 5.0)]
    # an intermediate that improves the other way than the study is reported negated
    neg = FakeTrial(prune_above=0.0)
    PruningCallback(neg, "loss", sign=-1.0).on_log(None, _State(4), None, logs={"loss": 0.25})
    assert neg.reports == [(4, -0.25)]


def test_a_pruned_run_is_recorded_failed_not_complete(tiny_world, tmp_path):
    from tvkd.pipeline import execute, identity

    spec = parse_search_spec(tiny_search(tiny_world))
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1, n_warmup_steps=0))
    study.add_trial(create_trial(value=0.0, params={"loss.alpha": 0.5}, distributions=spec.params,
                                 intermediate_values={s: 0.0 for s in range(1, 10)}))
    trial = study.ask(spec.params)
    cfg = trial_config(spec, trial.params, run_name="pruned", study="prune-test")
    store = ResultsStore(tmp_path / "results")
    cb = PruningCallback(trial, "train/loss")
    with pytest.raises(optuna.TrialPruned):
        execute(cfg, store=store, progress=False, callbacks=[cb])
    assert not store.is_complete(identity(cfg), study="prune-test", name="pruned")
    rec = RunRecord.read(cb.run_dir)
    assert rec.state == "failed" and "TrialPruned" in rec.status["error"]
    assert not (cb.run_dir / "metrics.json").exists()


def test_pruned_trials_do_not_stop_the_search(tiny_world, tmp_path):
    """A storage whose one finished trial had a perfect loss at every step: every new trial is pruned."""
    spec = tiny_search(tiny_world, name="all-pruned", n_trials=3,
                       pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    url = sqlite(tmp_path)
    parsed = parse_search_spec(spec)
    study = optuna.create_study(study_name="all-pruned", storage=url, direction="maximize")
    # maximizing margin accuracy with train/loss (minimized) as the intermediate: reported as -loss
    study.add_trial(create_trial(value=0.9, params={"loss.alpha": 0.5}, distributions=parsed.params,
                                 intermediate_values={s: 0.0 for s in range(1, 10)}))
    out = search_study(spec, storage=url, results=tmp_path / "results", progress=False)
    states = [t["state"] for t in out["trials"]]
    assert states == ["complete", "pruned", "pruned"]
    for t in out["trials"][1:]:
        rec = RunRecord.read(Path(t["run_dir"]))
        assert rec.state == "failed" and "TrialPruned" in rec.status["error"]
    assert out["best_value"] == 0.9 and out["best_params"] == {"loss.alpha": 0.5}
    assert load_config(out["best_config_path"]).loss.options["alpha"] == 0.5


# --------------------------------------------------------------------------------------------
# the spec: mistakes are caught before any trial runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"params": {"loss.alpha": {"grid_search": [0.1, 1.0]}}}, "OptunaSearch rejects it"),
    ({"params": {"loss.alhpa": {"low": 0.1, "high": 1.0}}}, "no option"),
    ({"params": {"train.learning_rate": {"low": -1.0, "high": 1.0}}}, "learning_rate"),
    ({"params": {"loss.alpha": {"low": 0.0, "high": 1.0, "log": True}}}, "log range needs low > 0"),
    ({"params": {"loss.alpha": {"choices": [[0.1]]}}}, "not a str, number"),
    ({"intermediate": None}, "needs search.intermediate"),
    ({"direction": "max"}, "maximize or minimize"),
    ({"sampler": "grid"}, "search.sampler"),
    ({"bogus": 1}, "no key"),
])
def test_spec_mistakes_are_named(tiny_world, change, message):
    spec = tiny_search(tiny_world)
    spec["search"].update(change)
    with pytest.raises(ConfigError, match=message):
        parse_search_spec(spec)


def test_spec_ranges_and_dotted_keys(tiny_world):
    spec = tiny_search(tiny_world, params={
        "loss.alpha": {"low": "1e-2", "high": 2.0, "log": True},  # YAML reads 1e-2 as a string
        "train.per_device_train_batch_size": {"low": 2, "high": 8, "step": 2},
        "loss.aux": ["log_prob", "soft_value"],
    })
    parsed = parse_search_spec(spec)
    kinds = {k: type(d).__name__ for k, d in parsed.params.items()}
    assert kinds == {"loss.alpha": "FloatDistribution", "train.per_device_train_batch_size": "IntDistribution",
                     "loss.aux": "CategoricalDistribution"}
    assert parsed.intermediate_sign == -1.0  # train/loss while maximizing
    cfg = trial_config(parsed, {"loss.alpha": 0.3, "train.per_device_train_batch_size": 6, "loss.aux": "soft_value"},
                       run_name="x-trial1", study="x")
    assert (cfg.loss.options["alpha"], cfg.loss.options["aux"], cfg.train.per_device_train_batch_size) == (
        0.3, "soft_value", 6)
    # the {name, options} form of a loss section takes loss.X into its options
    spec["base"]["loss"] = {"name": "tvkd", "options": {"aux": "log_prob"}}
    cfg = trial_config(parse_search_spec(spec), {"loss.alpha": 0.4}, run_name="y", study="y")
    assert cfg.loss.options == {"aux": "log_prob", "alpha": 0.4}


def test_resuming_with_a_changed_spec_is_an_error(tiny_world, tmp_path):
    url = sqlite(tmp_path)
    spec = tiny_search(tiny_world, n_trials=1, pruner="none", intermediate=None)
    search_study(spec, storage=url, results=tmp_path / "results", progress=False)
    spec["search"]["params"]["loss.alpha"]["high"] = 5.0
    with pytest.raises(ConfigError, match="changed: params"):
        search_study(spec, storage=url, results=tmp_path / "results", progress=False)
    with pytest.raises(ConfigError, match="no `search` block"):
        search_study({**spec, "variants": [{"label": "a"}], "search": None}, storage=url, results=tmp_path / "results")


def test_the_example_spec_parses_and_is_not_a_registered_study():
    from studies import STUDIES

    path = ROOT / "studies" / "examples" / "alpha_search.yaml"
    assert path.read_text().splitlines()[0].startswith("# tvkd study search studies/examples/alpha_search.yaml")
    spec = parse_search_spec(yaml.safe_load(path.read_text()), where=str(path))
    dist = spec.params["loss.alpha"]
    assert (dist.low, dist.high, dist.log) == (0.05, 2.0, True)
    assert (spec.metric, spec.direction, spec.n_trials) == ("oracle_score", "maximize", 8)
    assert spec.name not in STUDIES.names()
    cfg = config_from_dict(spec.base)
    assert cfg.models.student.startswith("testbed:")
    # and it loads the way `tvkd study search` loads it (the one study loader): base.seed is the trials' seed
    from studies.engine import load

    study_file = load(path)
    assert study_file.raw["base"]["seed"] == 0
    trial = trial_config(parse_search_spec(study_file.raw, where=str(path)), {"loss.alpha": 0.3}, run_name="t",
                         study="alpha-search")
    assert (trial.seed, trial.loss.options["alpha"]) == (0, 0.3)


def test_a_search_keeps_its_base_seed_and_refuses_a_seeds_list(tiny_world, tmp_path):
    from studies.engine import load
    from studies.spec import StudySpecError

    spec = tiny_search(tiny_world)
    spec["base"]["seed"] = 7
    assert load(spec).raw["base"]["seed"] == 7
    with pytest.raises(StudySpecError, match="seeds: a search trains every trial at one seed, base.seed"):
        load({**spec, "seeds": [0, 1]})
    grid = {k: v for k, v in spec.items() if k != "search"} | {"variants": [{"label": "a"}]}
    with pytest.raises(StudySpecError, match=r"base.seed: set by the study"):  # a grid's seeds are its `seeds`
        load(grid)


# --------------------------------------------------------------------------------------------
# Ray Tune (slow: starting Ray takes about a minute on two cores)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_through_ray_tune_uses_the_same_storage(tiny_world, tmp_path):
    pytest.importorskip("ray")
    url = sqlite(tmp_path)
    spec = tiny_search(tiny_world, name="ray-alpha", n_trials=2)
    out = search_study(spec, storage=url, results=tmp_path / "results", progress=False, backend="ray",
                       max_concurrent=2)
    assert len(finished(url, "ray-alpha")) == 2
    assert {t["run_name"] for t in out["trials"]} == {"ray-alpha-trial0", "ray-alpha-trial1"}
    for t in out["trials"]:
        if t["state"] == "complete":
            assert math.isfinite(t["value"]) and RunRecord.read(Path(t["run_dir"])).state == "complete"
    assert load_config(out["best_config_path"]).study == "ray-alpha"


def test_a_trial_left_without_an_owner_is_waited_for_then_failed_and_queued_again(tmp_path, monkeypatch):
    """A process killed between `study.ask` and marking the trial its own leaves a RUNNING trial with no
    owner and no heartbeat: young, it counts as another process's trial; past ORPHAN_GRACE it is
    failed and re-queued with its params and run name (it was never finished before)."""
    import datetime

    storage = search_mod.open_storage(sqlite(tmp_path, "orphans"))
    study = optuna.create_study(study_name="orphans", storage=storage)
    orphan = study.ask({"alpha": optuna.distributions.FloatDistribution(0.0, 1.0)})
    orphan.set_user_attr("run_name", "orphans-trial0")  # no OWNER_ATTR: the kill came before it
    me = search_mod._me()
    assert search_mod.reclaim_stale(study, me, set()) == (1, 1)
    assert study.trials[0].state == TrialState.RUNNING

    clock = datetime.datetime.now() + datetime.timedelta(seconds=search_mod.ORPHAN_GRACE + 1)
    monkeypatch.setattr(search_mod.datetime, "datetime", type("Later", (datetime.datetime,), {
        "now": classmethod(lambda cls, tz=None: clock)}))
    assert search_mod.reclaim_stale(study, me, set()) == (0, 0)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs == {"run_name": "orphans-trial0", "tvkd:retries": 1, "tvkd:retry_of": 0}
    assert study.trials[1].system_attrs["fixed_params"] == orphan.params

    # killed inside `ask`, before the params: failed, nothing queued (no run began; a fresh trial replaces it)
    bare = storage.create_new_trial(study._study_id)
    assert search_mod.reclaim_stale(study, me, set()) == (0, 0)
    assert [t.state for t in study.get_trials(deepcopy=False) if t._trial_id >= bare] == [TrialState.FAIL]

    # a trial this process is running, marked or not, is never taken for an orphan
    mine = study.ask({"alpha": optuna.distributions.FloatDistribution(0.0, 1.0)})
    assert search_mod.reclaim_stale(study, me, {mine._trial_id}) == (0, 0)
    assert study.trials[mine.number].state == TrialState.RUNNING


@pytest.mark.parametrize("url, message", [
    ("notaurl", "not a database URL"),
    ("sqlite:////proc/no-such-folder/search.db", "cannot open the database"),
    ("postgresql://nohost/db", "no database driver for 'postgresql' is installed"),
])
def test_a_storage_that_cannot_be_opened_is_one_line(tiny_world, tmp_path, url, message):
    with pytest.raises(ConfigError, match=message):
        search_study(tiny_search(tiny_world), storage=url, results=tmp_path / "results", progress=False)
    assert not (tmp_path / "results" / "tiny-alpha").exists()
