"""The Ray Tune executor (studies/ray_executor.py): a 4-run grid at 2 concurrent trials whose tables equal the
sequential backend's byte for byte, a failed trial, a driver SIGKILLed mid-study then restored, and no secret
in what Ray is given or logs; on the tiny models of `tiny_world` and a local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_study import tiny_spec

pytest.importorskip("ray.tune")

from studies.engine import Sequential, run_study  # noqa: E402
from studies.ray_executor import RayExecutor  # noqa: E402
from studies.ray_session import trial_env  # noqa: E402
from studies.spec import Resources  # noqa: E402
from tvkd.results import RunRecord  # noqa: E402


def run_study_ray(spec, *, results, max_concurrent=None, progress=False, **kw):
    return run_study(spec, RayExecutor(max_concurrent=max_concurrent, **kw), results=results, progress=progress)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")


def ray_spec(world, name: str, **train) -> dict:
    """dpo and soft_value x seeds 0, 1 on the tiny models: 4 runs."""
    spec = tiny_spec(world)
    spec["name"] = name
    spec["variants"] = spec["variants"][:2]
    spec["base"]["train"].update(train)
    return spec


def run_dirs(results: Path, study: str) -> list[Path]:
    return sorted(p for p in (results / study).iterdir() if p.is_dir() and p.name != "tables")


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: what one `start_new_session` subprocess started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.getsid(int(entry.name)) == sid and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def end_session(sid: int) -> None:
    """SIGKILL every process of the session we started (Ray daemons and workers a killed driver left)."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_the_trial_environment_carries_no_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("TVKD_JUDGE_API_KEY", "sk-planted-judge-key")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-openai-key")
    monkeypatch.setenv("HF_TOKEN", "hf_planted")
    monkeypatch.setenv("TVKD_GENERATION", "generate")
    env = trial_env(tmp_path)
    assert not [k for k in env if {"KEY", "TOKEN"} & set(k.split("_"))]
    assert env["TVKD_GENERATION"] == "generate" and env["TVKD_RESULTS"] == str(tmp_path.resolve())
    assert "sk-planted" not in json.dumps(env)


def test_an_address_nothing_answers_at_is_one_error_line_in_seconds(capsys, tmp_path):
    """Ray retries a dead address for minutes; the CLI checks the head's port first (before planning)."""
    import socket

    from studies.ray_session import RaySessionError, check_reachable
    from tests.test_trust import cli

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RaySessionError, match=r"nothing answers there \(Connection refused"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(RaySessionError, match="the host 'no-such-host.invalid' does not resolve"):
        check_reachable("ray://no-such-host.invalid:10001")
    check_reachable("auto")  # Ray's own lookup: nothing to check here
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    started = time.monotonic()
    code, _, err = cli(capsys, "study", "run", "reward-conflict", "--backend", "ray", "--address", f"127.0.0.1:{port}",
                       "--results", tmp_path)
    assert code == 2 and err.startswith("error: ray: cannot connect to the cluster") and time.monotonic() - started < 30
    code, _, err = cli(capsys, "study", "search", str(ROOT / "studies" / "examples" / "alpha_search.yaml"),
                       "--backend", "ray", "--address", f"127.0.0.1:{port}", "--results", tmp_path)
    assert code == 2 and "nothing answers there" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_resources_override_takes_the_place_of_the_spec(tiny_world, tmp_path):
    spec = {**ray_spec(tiny_world, "ray-res"), "resources": {"cpu": 64}}
    with pytest.raises(ValueError, match="a trial needs 64 CPU / 0 GPU on one node"):
        run_study_ray(spec, results=tmp_path / "results")  # refused before any trial waits for ever
    assert not (tmp_path / "results" / "ray-res").exists()
    assert RayExecutor(resources=Resources(cpu=2)).resources.as_tune() == {"cpu": 2.0, "gpu": 0.0}


def test_sequential_and_ray_write_byte_identical_tables(tiny_world, tmp_path, monkeypatch):
    """The same grid run one after another and as Ray trials, 2 at once: the same table files, byte for byte;
    and the planted secret never reaches Ray's logs."""
    monkeypatch.setenv("TVKD_JUDGE_API_KEY", "sk-planted-judge-key-123")
    spec = ray_spec(tiny_world, "same-grid")
    seq = run_study(spec, Sequential(), results=tmp_path / "seq", progress=False)
    ray_out = run_study_ray(spec, results=tmp_path / "ray", max_concurrent=2)
    assert ray_out["failed"] == [] and all(t["trained"] for t in ray_out["trials"])
    seq_files = {p.relative_to(seq["out_dir"]): p.read_bytes() for p in sorted(seq["out_dir"].iterdir())}
    ray_files = {p.relative_to(ray_out["out_dir"]): p.read_bytes() for p in sorted(ray_out["out_dir"].iterdir())}
    assert len(seq_files) >= 3 and set(seq_files) == set(ray_files)  # table.md, table.tex, runs.csv
    differ = [str(name) for name in seq_files if name.name != "runs.csv" and seq_files[name] != ray_files[name]]
    assert not differ, differ
    # runs.csv: the same rows and numbers, but for the run folders and what a clock or a memory meter measured
    import pandas as pd

    def measured(name: str) -> bool:
        return name == "run_dir" or any(w in name for w in ("seconds", "memory", "runtime", "per_second", "_time"))

    seq_csv, ray_csv = (pd.read_csv(d / "runs.csv") for d in (seq["out_dir"], ray_out["out_dir"]))
    assert list(seq_csv.columns) == list(ray_csv.columns)
    kept = [c for c in seq_csv.columns if not measured(c)]
    assert len(kept) > 10
    pd.testing.assert_frame_equal(seq_csv[kept], ray_csv[kept])
    logs = Path("/tmp/ray/session_latest/logs")
    if logs.is_dir():
        leaked = [str(f) for f in logs.rglob("*") if f.is_file() and b"sk-planted-judge-key-123" in f.read_bytes()]
        assert not leaked, leaked


def test_four_runs_at_two_concurrent_trials_then_nothing_to_train(tiny_world, tmp_path):
    spec = ray_spec(tiny_world, "ray-grid")
    results = tmp_path / "results"
    out = run_study_ray(spec, results=results, max_concurrent=2, progress=False)
    assert out["failed"] == [] and len(out["frame"]) == 4
    assert {(t["label"], t["seed"]) for t in out["trials"]} == {(v, s) for v in ("dpo", "soft_value") for s in (0, 1)}
    assert all(t["status"] == "TERMINATED" and t["trained"] and t["node_id"] for t in out["trials"])
    dirs = run_dirs(results, "ray-grid")
    records = [RunRecord.read(d) for d in dirs]
    assert len(dirs) == 4 and all(r.complete and r.status["attempt"] == 1 for r in records)  # each trained once
    assert out["tables"]["md"].exists() and (out["out_dir"] / "runs.csv").exists()
    assert Path(out["experiment"]).parent == results / ".ray" / "ray-grid"
    mtimes = {d: (d / "metrics.json").stat().st_mtime_ns for d in dirs}

    again = run_study_ray(spec, results=results, max_concurrent=2, progress=False)
    assert again["experiment"] is None and again["trials"] == []  # nothing to run: no Ray at all
    assert {d: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(results, "ray-grid")} == mtimes
    assert len(again["frame"]) == 4 and again["tables"]["md"].exists()


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tiny_world, tmp_path):
    spec = ray_spec(tiny_world, "ray-fail")
    spec.update(table=None, seeds=[0], reference_variant=None)
    # fails inside training, after the run folder is started: the Trainer wants an eval set for it
    spec["variants"] = [{"label": "broken", "loss": {"name": "dpo"},
                         "train": {"extra": {"eval_strategy": "steps", "eval_steps": 1}}}, spec["variants"][0]]
    out = run_study_ray(spec, results=tmp_path / "results", max_concurrent=1, progress=False)
    assert [f["label"] for f in out["failed"]] == ["broken"]
    failure = out["failed"][0]
    assert "eval_dataset" in failure["store_error"] and "Traceback" in failure["traceback"]
    record = RunRecord.read(Path(failure["run_dir"]))
    assert record.state == "failed" and "eval_dataset" in record.status["traceback"]
    assert list(out["frame"]["label"]) == ["dpo"]  # the run after the failure still ran
    assert {t["label"]: t["status"] for t in out["trials"]} == {"broken": "ERROR", "dpo": "TERMINATED"}


DRIVER = """
import json, sys
from studies.engine import run_study
from studies.ray_executor import RayExecutor
run_study(json.loads(open(sys.argv[1]).read()), RayExecutor(max_concurrent=1), results=sys.argv[2])
"""


def test_driver_killed_mid_study_is_restored_without_retraining(tiny_world, tmp_path):
    spec = ray_spec(tiny_world, "ray-kill", num_train_epochs=20)  # trials of a few seconds
    spec["base"]["data"]["subsample"] = 1.0
    results = tmp_path / "results"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "spec.json"), str(results)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 240
        done: list[Path] = []
        while not done:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.1)
            done = [d for d in (results / "ray-kill").glob("*-*") if RunRecord.read(d).complete]
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its Ray processes are left as a crash leaves them
        driver.wait()
        done = [d for d in (results / "ray-kill").glob("*-*") if RunRecord.read(d).complete]
        assert 1 <= len(done) < 4
        mtimes = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in done}
        pointer = json.loads((results / ".ray" / "ray-kill" / "tvkd-experiment.json").read_text())
        assert pointer["state"] == "running"

        out = run_study_ray(spec, results=results, max_concurrent=2, progress=False)
        assert Path(out["experiment"]).name == pointer["experiment"]  # Tuner.restore, not a fresh experiment
        assert out["failed"] == [] and len(out["frame"]) == 4
        dirs = run_dirs(results, "ray-kill")
        assert len(dirs) == 4  # one folder per run, no duplicates
        assert all(RunRecord.read(d).complete for d in dirs)
        assert {d.name: (d / "metrics.json").stat().st_mtime_ns for d in dirs if d.name in mtimes} == mtimes
        assert all(RunRecord.read(results / "ray-kill" / name).status["attempt"] == 1 for name in mtimes)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        end_session(driver.pid)  # what the killed driver's local Ray left (raylet agents, workers)
        log.close()


@pytest.mark.slow  # ~60 s: a Ray session
def test_sequential_and_ray_pick_the_same_rates_through_the_one_selection(tiny_world, tmp_path):
    """A study with `select` over learning rates: both backends end in `write_outputs`, so the picks
    (selection.md / .csv) and the table of the picked runs are the same files."""
    from tests.test_bench_rm_score import _tiny_rm

    spec = ray_spec(tiny_world, "select-grid")
    spec.update(seeds=[0], reference_variant="dpo",
                select={"metric": "rm_score", "over": "learning_rate", "values": [1e-4, 1e-2]})
    spec.pop("table")  # the generic grid table of the picked runs
    spec["base"]["data"]["validation_fraction"] = 0.4
    spec["base"]["eval"]["validation_reward_model"] = _tiny_rm(tmp_path / "rm", adds_bos=False)
    del spec["base"]["train"]["learning_rate"]
    seq = run_study(spec, Sequential(), results=tmp_path / "seq", progress=False)
    ray_out = run_study_ray(spec, results=tmp_path / "ray", max_concurrent=2)
    assert ray_out["failed"] == [] and len(ray_out["trials"]) == 4
    for name in ("selection.md", "selection.csv", "grid.md", "grid.tex"):
        assert (seq["out_dir"] / name).read_bytes() == (ray_out["out_dir"] / name).read_bytes(), name
    assert (seq["out_dir"] / "selection.md").read_text().count("**picked**") == 2
