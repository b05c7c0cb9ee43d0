"""The Ray Tune executor of the study engine: one trial per run, locally or on a Ray cluster.

    run_study("reward-conflict", RayExecutor(max_concurrent=2))                 # a local Ray on this machine
    run_study("reward-conflict", RayExecutor(address="10.0.0.1:6379"))          # a cluster (`ray start`)

It only decides where runs happen: every trial calls `tvkd.pipeline.execute` for its run, so a run
finished by any backend (this one, the sequential one, another machine) is found in the store, never
trained again, and `studies.engine.run_study` writes the tables from the store at the end, the same
call for every backend. Specifics of this backend:

- resources: the study file's ``resources: {cpu: 1, gpu: 0}`` (default one CPU, no GPU) is what
  each trial reserves (`tune.with_resources`); ``resources=`` overrides it. ``max_concurrent`` caps
  the trials running at once (default: as many as the resources allow).
- crash safety: the Tune experiment lives in ``storage`` (default ``<results>/.ray/<study>``, with
  ``tvkd-experiment.json`` naming the current experiment); a driver killed mid-study is resumed by
  the next call (`Tuner.restore`, errored trials retried; Tune keeps the restored experiment's own
  ``max_concurrent``), and a run killed half way is redone (or resumed from its checkpoint) by
  `execute`; a run still held by a killed driver's leftover worker is waited for, not run twice.
  A call after a finished study starts a fresh experiment for whatever the store lacks, or none at
  all (then Ray is not even started). One driver per study storage at a time (a lock says so).
- failures: a failed trial does not stop the others; `execute` records the error and traceback in
  the run's ``status.json``, and the engine names them at the end (``out["failed"]``).
- the session (address, environment without secrets, authentication, resources): `studies.ray_session`;
  on a multi-machine cluster the results root, the cache and ``storage`` must be on a shared
  filesystem at the same path.
- each trial reports the run's numeric metrics and the Ray node it ran on (``ray_node_id``,
  ``ray_node_ip``); ``out["trials"]`` lists them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from studies.ray_session import check_resources, ray_session
from studies.spec import Resources, StudyFile, StudyRun
from tvkd.paths import atomic_write_json, fingerprint
from tvkd.results import ResultsStore, RunInProgressError

__all__ = ["RayExecutor", "study_trial"]

#: How long a trial waits for another live process that holds its run (then it fails with that error).
LOCK_WAIT_S = 1800.0
#: Keys Tune fills in itself: a metric of the same name is not reported.
_TUNE_KEYS = frozenset({
    "done", "training_iteration", "trial_id", "experiment_id", "date", "timestamp", "time_this_iter_s",
    "time_total_s", "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total",
    "pid", "hostname", "node_ip", "config", "should_checkpoint", "experiment_tag",
})
_POINTER = "tvkd-experiment.json"  # in the storage folder: the current experiment and whether it finished


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------


def _execute_waiting(cfg: Any, store: Any, progress: bool, wait_s: float) -> Any:
    """`execute`, waiting while another live process holds the run (a killed driver's leftover worker, or
    another backend on the same run): it then finds the run complete, or takes it over."""
    from tvkd.pipeline import execute  # lazy: torch, transformers

    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return execute(cfg, store=store, progress=progress)
        except RunInProgressError:
            if time.monotonic() > deadline:
                raise
            if not told:
                print(f"[{cfg.name} seed {cfg.seed}] another process is writing this run; waiting for it", flush=True)
                told = True
            time.sleep(3.0)


def study_trial(config: dict[str, Any], *, runs: list, results: str, cwd: str | None, progress: bool = True,
                lock_wait_s: float = LOCK_WAIT_S) -> None:
    """One Tune trial: run (or load) the study run ``runs[config["run"]]`` and report its metrics and node."""
    import ray  # lazy: ray
    from ray import tune

    index = int(config["run"])
    cfg = runs[index].config
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in a study spec mean what they mean to the driver
    t0 = time.time()
    rec = _execute_waiting(cfg, ResultsStore(results), progress, lock_wait_s)
    started = rec.status.get("started_at")
    try:
        fresh = _dt.datetime.fromisoformat(started).timestamp() >= int(t0)
    except (TypeError, ValueError):
        fresh = False
    metrics = {k: v for k, v in (rec.metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TUNE_KEYS}
    tune.report({
        **metrics, "run": index, "label": cfg.name, "seed": cfg.seed, "run_dir": str(rec.run_dir),
        "state": rec.state, "trained": bool(fresh and rec.status.get("pid") == os.getpid()),
        "wall_s": round(time.time() - t0, 3), "ray_node_id": ray.get_runtime_context().get_node_id(),
        "ray_node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "worker_pid": os.getpid(),
    })


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------

_ACTIVE: dict[str, Any] = {}  # set by the driver for the callback: a restored experiment unpickles an old one


def _trial_label(trial: Any) -> str:
    runs = _ACTIVE.get("runs") or []
    i = (trial.config or {}).get("run")
    if isinstance(i, int) and 0 <= i < len(runs):
        return f"{runs[i].label} seed {runs[i].seed}"
    return str(trial)


def _progress_callback():
    from ray import tune  # lazy: ray

    class StudyProgress(tune.Callback):
        """One line per trial event: how many of the experiment's trials are finished, running, failed, pending."""

        def setup(self, **info: Any) -> None:
            self.started: dict[str, float] = {}
            self.finished: set[str] = set()
            self.failed: set[str] = set()

        def _line(self, trials: list, msg: str) -> None:
            if not _ACTIVE.get("progress", True):
                return
            self.finished |= {t.trial_id for t in trials if t.status == "TERMINATED"}
            self.failed |= {t.trial_id for t in trials if t.status == "ERROR"} - self.finished
            running = len(set(self.started) - self.finished - self.failed)
            total = max(int(_ACTIVE.get("total") or 0), len(trials))
            pending = max(0, total - len(self.finished) - len(self.failed) - running)
            print(f"[ray {len(self.finished)}/{total} finished, {running} running, {len(self.failed)} failed, "
                  f"{pending} pending] {msg}", flush=True)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.time()
            self._line(trials, f"{_trial_label(trial)}: started")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.finished.add(trial.trial_id)
            r = trial.last_result or {}
            what = "trained" if r.get("trained") else "already complete"
            node = str(r.get("ray_node_id", "?"))[:8]
            self._line(trials, f"{_trial_label(trial)}: {what} on node {node} ({r.get('ray_node_ip', '?')}) "
                               f"in {time.time() - self.started.get(trial.trial_id, time.time()):.1f}s")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.failed.add(trial.trial_id)
            self._line(trials, f"{_trial_label(trial)}: FAILED (see the summary at the end)")

    return StudyProgress()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _read_pointer(storage: Path) -> dict[str, Any]:
    try:
        obj = json.loads((storage / _POINTER).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@contextmanager
def _driver_lock(storage: Path):
    """One driver per study storage at a time (a second one would fight over the same Tune experiment)."""
    import fcntl

    storage.mkdir(parents=True, exist_ok=True)
    fd = os.open(storage / ".driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another Ray driver is running this study (lock {storage / '.driver.lock'})") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def _quiet_tune():
    """Tune's legacy output engine, which `verbose=0` silences (the new one still prints its header box):
    the progress lines are `StudyProgress`'s."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _first_line(text: str | None) -> str:
    lines = [ln.strip() for ln in str(text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class RayExecutor:
    """The study's runs as Ray Tune trials, locally or on a cluster (see the module docstring).

    ``address``: an existing cluster (HOST:PORT), else a local Ray on this machine's CPUs;
    ``max_concurrent``: trials at once (default: as many as the resources allow); ``storage``: the
    Tune experiment folder (default ``<results>/.ray/<study>``); ``resources``: what one trial reserves
    (default the study file's ``resources``).
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, max_concurrent: int | None = None,
                 storage: str | Path | None = None, resources: Resources | None = None):
        if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                           or max_concurrent < 1):
            raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
        self.address, self.max_concurrent, self.storage, self.resources = address, max_concurrent, storage, resources
        self.trials: list[dict[str, Any]] = []
        self.experiment: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {"trials": self.trials, "experiment": str(self.experiment) if self.experiment else None}

    def run(self, spec: StudyFile, runs: list[StudyRun], store: ResultsStore, *, progress: bool
            ) -> list[dict[str, Any]]:
        from ray import tune  # lazy: ray

        from tvkd.pipeline import identity  # lazy: torch, transformers

        res = self.resources or spec.resources
        study = runs[0].config.study if runs else spec.study_name()
        keys = [identity(r.config, progress=progress) for r in runs]  # builds the testbed here, once, if needed
        storage_dir = (Path(self.storage) if self.storage else store.root / ".ray" / study).expanduser().resolve()
        grid = fingerprint([{"study": r.config.study, "name": r.label, "key": key} for r, key in zip(runs, keys)],
                           length=12)
        trials = self.trials
        failed: dict[int, dict[str, Any]] = {}

        def incomplete() -> list[int]:
            return [i for i, (r, key) in enumerate(zip(runs, keys))
                    if not store.is_complete(key, study=r.config.study, name=r.label)]

        missing = incomplete()
        _say(progress, f"ray: {res.cpu:g} CPU / {res.gpu:g} GPU per trial, {self.max_concurrent or 'as many as fit'} "
                       "at once")

        def fit(tuner: Any, path: Path) -> None:
            """Run the experiment to its end, mark it finished, and collect its trials (and failures)."""
            with _quiet_tune():
                grid_results = tuner.fit()
            atomic_write_json(storage_dir / _POINTER, {**_read_pointer(storage_dir), "experiment": path.name,
                                                       "grid": grid, "state": "finished"})
            for r in grid_results:
                m = r.metrics or {}
                i = (r.config or {}).get("run", m.get("run"))
                run = runs[i] if isinstance(i, int) and 0 <= i < len(runs) else None
                row = {"run": i, "label": run.label if run else m.get("label"), "seed": run.seed if run else
                       m.get("seed"), "status": "ERROR" if r.error else "TERMINATED", "node_id": m.get("ray_node_id"),
                       "node_ip": m.get("ray_node_ip"), "trained": m.get("trained"), "wall_s": m.get("wall_s"),
                       "run_dir": m.get("run_dir"), "error": None, "experiment": path.name}
                if r.error is not None:
                    row["error"] = "".join(traceback.format_exception_only(type(r.error), r.error)).strip()
                    if isinstance(i, int):
                        failed[i] = row
                trials.append(row)

        with _driver_lock(storage_dir):
            pointer = _read_pointer(storage_dir)
            previous = storage_dir / pointer["experiment"] if pointer.get("experiment") else None
            restore = (previous is not None and pointer.get("grid") == grid and pointer.get("state") != "finished"
                       and tune.Tuner.can_restore(previous))
            if restore or missing:
                with ray_session(self.address, store.root, progress=progress):
                    check_resources(res, self.address)
                    trainable = tune.with_resources(
                        tune.with_parameters(study_trial, runs=runs, results=str(store.root), cwd=os.getcwd(),
                                             progress=progress), res.as_tune())
                    _ACTIVE.update(runs=runs, progress=progress)
                    if restore:
                        self.experiment = previous
                        print(f"ray: restoring the interrupted experiment {previous}", flush=True)
                        _ACTIVE["total"] = len(pointer.get("runs") or [])
                        fit(tune.Tuner.restore(str(previous), trainable, resume_errored=True), previous)
                        missing = [i for i in incomplete() if i not in failed]  # runs that experiment did not cover
                    if missing:
                        name = f"grid-{grid}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
                        self.experiment = storage_dir / name
                        atomic_write_json(storage_dir / _POINTER, {"experiment": name, "grid": grid,
                                                                   "state": "running", "runs": missing})
                        _ACTIVE["total"] = len(missing)
                        fit(tune.Tuner(
                            trainable, param_space={"run": tune.grid_search(missing)},
                            tune_config=tune.TuneConfig(max_concurrent_trials=self.max_concurrent, reuse_actors=True),
                            run_config=tune.RunConfig(
                                name=name, storage_path=str(storage_dir), verbose=0, callbacks=[_progress_callback()],
                                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False))), self.experiment)
            trials.sort(key=lambda t: (t["run"] if isinstance(t["run"], int) else -1))

        out = []
        for i, (r, key) in enumerate(zip(runs, keys)):
            rec = store.load(key, study=r.config.study, name=r.label, complete_only=False)
            if rec is not None and rec.complete:
                continue  # e.g. a leftover worker of a killed driver finished a failed trial's run meanwhile
            entry = failed.get(i, {"run": i, "label": r.label, "seed": r.seed, "status": "MISSING",
                                   "error": "not complete in the results store"})
            entry["error"] = _first_line(entry.get("error"))
            if rec is not None:
                entry["run_dir"] = str(rec.run_dir)
                entry["store_state"] = rec.state
                if rec.status.get("error"):
                    entry["error"] = entry["store_error"] = rec.status["error"]
                    entry["traceback"] = rec.status.get("traceback")
            out.append(entry)
        nodes = {t["node_id"] for t in trials if t.get("node_id")}
        _say(progress, f"ray: {sum(bool(t.get('trained')) for t in trials)} trained now on {len(nodes)} node(s)")
        return out
