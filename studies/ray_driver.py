"""Ray Tune backend of the study runner: one trial per (variant, seed) run, locally or on a Ray cluster.

    run_study_ray("reward-conflict", max_concurrent=2)                  # a local Ray on this machine's CPUs
    run_study_ray("reward-conflict", address="10.0.0.1:6379")           # an existing cluster (`ray start`)

It runs the same runs as `studies.runner.run_study` (`expand_study`) and leaves the same results
store behind: every trial calls `tvkd.pipeline.execute` for its run, so a run finished by any
backend (this one, the sequential one, another machine) is returned from the store, never trained
again, and the tables are built from the store at the end by the same functions (`study_frame` and
the registered table generator). Specifics of this backend:

- resources: ``resources: {cpu: 1, gpu: 0}`` at the top level of the study spec (default one CPU,
  no GPU) is what each trial reserves (`tune.with_resources`); ``resources=`` overrides it. The
  key is read here and left out of what `studies.spec.parse_spec` validates (it does not know it).
  ``max_concurrent`` caps the trials running at once (default: as many as the resources allow).
- crash safety: the Tune experiment lives in ``storage`` (default ``<results>/.ray/<study>``, with
  ``tvkd-experiment.json`` naming the current experiment); a driver killed mid-study is resumed by
  the next call (`Tuner.restore`, errored trials retried; Tune keeps the restored experiment's own
  ``max_concurrent``), and a run killed half way is redone (or resumed from its checkpoint) by
  `execute`; a run still held by a killed driver's leftover worker is waited for, not run twice.
  A call after a finished study starts a fresh experiment for whatever the store lacks, or none at
  all (then Ray is not even started). One driver per study storage at a time (a lock says so).
- failures: a failed trial does not stop the others; `execute` records the error and traceback in
  the run's ``status.json``, and the errors are summarised at the end (``out["failed"]``).
- environment: the trials get the driver's TVKD_*, HF_* and tokenizer settings, its results root
  and cache root (``ray.init(runtime_env={"env_vars": ...})``); on a multi-machine cluster the
  results root, the cache and ``storage`` must be on a shared filesystem at the same path.
- each trial reports the run's numeric metrics and the Ray node it ran on (``ray_node_id``,
  ``ray_node_ip``); ``out["trials"]`` lists them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from studies.runner import expand_study, load_study, study_frame
from studies.spec import StudySpec, parse_spec
from tvkd.paths import atomic_write_json, cache_root, fingerprint, results_root

__all__ = ["bench_ray_speedup", "load_ray_study", "run_study_ray", "trial_resources", "write_tables"]

#: Environment variables a trial needs to see as the driver does (plus every TVKD_* one).
TRIAL_ENV_VARS = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
    "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY", "RAY_AUTH_MODE",
)
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
# Resources and environment
# --------------------------------------------------------------------------------------------


def trial_resources(spec: dict[str, Any], override: dict[str, Any] | None = None) -> dict[str, float]:
    """What one trial reserves: the spec's top-level ``resources: {cpu, gpu}`` (default 1 CPU, no GPU),
    with ``override`` on top. Returned as Tune wants it: ``{"cpu": n, "gpu": m}``."""
    import difflib

    out: dict[str, float] = {"cpu": 1, "gpu": 0}
    for where, given in (("resources", spec.get("resources")), ("resources=", override)):
        if given is None:
            continue
        if not isinstance(given, dict):
            raise ValueError(f"study {spec.get('name')!r}: {where} must be a mapping like {{cpu: 1, gpu: 0}}, "
                             f"got {given!r}")
        for key, value in given.items():
            k = str(key).lower()
            if k not in out:
                close = difflib.get_close_matches(k, list(out), n=1)
                raise ValueError(f"study {spec.get('name')!r}: {where}.{key} is not a trial resource (cpu, gpu)"
                                 + (f". Did you mean {close[0]!r}?" if close else ""))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (k == "cpu" and value == 0):
                raise ValueError(f"study {spec.get('name')!r}: {where}.{key} must be a number "
                                 f"{'> 0' if k == 'cpu' else '>= 0'}, got {value!r}")
            out[k] = value
    return out


def trial_env(results: Path) -> dict[str, str]:
    """The environment variables every trial gets: the driver's TVKD_*/HF_* settings, its results root
    and cache root (absolute), and a PYTHONPATH that finds this checkout's `studies` and `tvkd`."""
    env = {k: v for k, v in os.environ.items() if k.startswith("TVKD_") or k in TRIAL_ENV_VARS}
    env["TVKD_RESULTS"] = str(results)
    env["TVKD_CACHE"] = str(cache_root().resolve())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p != root]])
    return env


@contextmanager
def _ray_session(address: str | None, env: dict[str, str], progress: bool):
    """Connect to ``address`` (an existing cluster) or start a local Ray on this machine's CPUs; yields
    whether this call started the connection (then it also ends it)."""
    import logging

    import ray

    if ray.is_initialized():
        _say(progress, "ray: using the Ray session already open in this process (its runtime environment is "
                       "kept: make sure its trials see TVKD_RESULTS / TVKD_CACHE)")
        yield False
        return
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": progress,
                              "logging_level": logging.INFO if progress else logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
    else:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        # "local": never attach to a cluster that `ray start` left on this machine
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **kwargs)
    try:
        yield True
    finally:
        ray.shutdown()


def _check_resources(res: dict[str, float], address: str | None) -> None:
    """A trial must fit on one node: say so now rather than let Tune wait for ever."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= res["cpu"] and n.get("GPU", 0) >= res["gpu"] for n in nodes):
        return
    largest = ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
    msg = (f"resources: a trial needs {res['cpu']:g} CPU / {res['gpu']:g} GPU on one node, the cluster's nodes have "
           f"{largest} (lower `resources:` in the study spec, or add a node that has them)")
    if address:  # an autoscaling cluster may still add such a node
        print(f"warning: {msg}; the trials wait until there is one", file=sys.stderr, flush=True)
    else:
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------


def _execute_waiting(cfg: Any, store: Any, progress: bool, wait_s: float) -> Any:
    """`execute`, waiting while another live process holds the run (a killed driver's leftover worker, or
    another backend on the same run): it then finds the run complete, or takes it over."""
    from tvkd.pipeline import execute
    from tvkd.results import RunInProgressError

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
    import ray
    from ray import tune

    from tvkd.results import ResultsStore

    index = int(config["run"])
    info, cfg = runs[index]
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
        return f"{runs[i][1].name} seed {runs[i][1].seed}"
    return str(trial)


def _progress_callback():
    from ray import tune

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
# Tables (the same functions as run_study)
# --------------------------------------------------------------------------------------------


def write_tables(spec: StudySpec, rows: list[dict[str, Any]], store: Any, out_dir: str | Path | None,
                 quick: bool, *, partial: bool = False) -> dict[str, Any]:
    """What `run_study` does after its runs: `study_frame`, the registered table generator, runs.csv.

    ``partial`` (some runs failed): a table generator that cannot cope with the missing rows is
    reported instead of raised, so that the failures are still summarised.
    """
    from reports.tables import discover

    raw = spec.raw
    frame = study_frame(raw, rows)
    out = Path(out_dir) if out_dir else store.root / spec.study_name(quick) / "tables"
    try:
        tables = discover().get(raw["table"])(frame, out) if raw.get("table") and rows else {}
    except Exception as e:  # noqa: BLE001 - only with failed runs; re-raised otherwise
        if not partial:
            raise
        print(f"tables not written ({len(rows)} complete runs only): {type(e).__name__}: {e}", flush=True)
        tables = {}
    items = [c for c in frame.columns if c.startswith("items.")]
    out.mkdir(parents=True, exist_ok=True)  # a grid without a table still gets its runs.csv
    frame.drop(columns=["record", *items], errors="ignore").to_csv(out / "runs.csv", index=False)
    return {"frame": frame, "tables": tables, "out_dir": out}


def load_ray_study(name_or_spec: str | Path | dict[str, Any] | StudySpec, resources: dict[str, Any] | None = None
                   ) -> tuple[StudySpec, dict[str, float]]:
    """(the validated spec, what one trial reserves). ``resources:`` is read from the raw spec and left out of
    what `studies.spec.parse_spec` validates, which does not know that key (yet)."""
    if isinstance(name_or_spec, StudySpec):
        raw, source = name_or_spec.raw, name_or_spec.source
    else:
        raw = load_study(name_or_spec)
        source = None if isinstance(name_or_spec, dict) else str(name_or_spec)
    if not isinstance(raw, dict):
        raise ValueError(f"study {source}: the top level must be a mapping, got {type(raw).__name__}")
    res = trial_resources(raw, resources)
    return parse_spec({k: v for k, v in raw.items() if k != "resources"}, source=source), res


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


def run_study_ray(name_or_spec: str | Path | dict[str, Any] | StudySpec, *, seeds: list[int] | None = None,
                  results: str | Path | None = None, out_dir: str | Path | None = None, quick: bool = False,
                  address: str | None = None, max_concurrent: int | None = None, storage: str | Path | None = None,
                  resources: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a study with one Ray Tune trial per run, then write its tables from the store.

    Returns what `run_study` returns (``frame``, ``tables``, ``out_dir``) plus ``trials`` (one dict per
    trial of this call's experiment: run index, label, seed, status, node id/IP, whether it trained,
    wall time, run folder, error), ``failed`` (the runs that failed, with their error) and
    ``experiment`` (the Tune experiment folder, or None when nothing had to run).
    """
    from ray import tune

    from tvkd.pipeline import identity
    from tvkd.results import ResultsStore

    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
    spec, res = load_ray_study(name_or_spec, resources)  # validated: a bad spec stops here, before Ray starts
    study = spec.study_name(quick)
    store = ResultsStore((Path(results) if results else results_root()).expanduser().resolve())
    runs = expand_study(spec, seeds=seeds, quick=quick)
    t0 = time.perf_counter()
    keys = [identity(cfg, progress=progress) for _, cfg in runs]  # builds the testbed here, once, if needed
    storage_dir = (Path(storage) if storage else store.root / ".ray" / study).expanduser().resolve()
    grid = fingerprint([{"study": cfg.study, "name": cfg.name, "key": key} for (_, cfg), key in zip(runs, keys)],
                       length=12)
    trials: list[dict[str, Any]] = []
    failed: dict[int, dict[str, Any]] = {}
    experiment: Path | None = None

    def incomplete() -> list[int]:
        return [i for i, ((_, cfg), key) in enumerate(zip(runs, keys))
                if not store.is_complete(key, study=cfg.study, name=cfg.name)]

    missing = incomplete()
    print(f"study {spec.name}{' (quick)' if quick else ''} on Ray: {len(runs)} runs, "
          f"{len(runs) - len(missing)} already complete; {res['cpu']:g} CPU / {res['gpu']:g} GPU per trial, "
          f"{max_concurrent or 'as many as fit'} at once", flush=True)

    def fit(tuner: Any, path: Path) -> None:
        """Run the experiment to its end, mark it finished, and collect its trials (and failures)."""
        with _quiet_tune():
            grid_results = tuner.fit()
        atomic_write_json(storage_dir / _POINTER, {**_read_pointer(storage_dir), "experiment": path.name, "grid": grid,
                                                   "state": "finished"})
        for r in grid_results:
            m = r.metrics or {}
            i = (r.config or {}).get("run", m.get("run"))
            cfg = runs[i][1] if isinstance(i, int) and 0 <= i < len(runs) else None
            row = {"run": i, "label": cfg.name if cfg else m.get("label"), "seed": cfg.seed if cfg else m.get("seed"),
                   "status": "ERROR" if r.error else "TERMINATED", "node_id": m.get("ray_node_id"),
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
            with _ray_session(address, trial_env(store.root), progress):
                _check_resources(res, address)
                trainable = tune.with_resources(
                    tune.with_parameters(study_trial, runs=runs, results=str(store.root), cwd=os.getcwd(),
                                         progress=progress),
                    {"cpu": res["cpu"], "gpu": res["gpu"]})
                _ACTIVE.update(runs=runs, progress=progress)
                if restore:
                    experiment = previous
                    print(f"ray: restoring the interrupted experiment {experiment}", flush=True)
                    _ACTIVE["total"] = len(pointer.get("runs") or [])
                    fit(tune.Tuner.restore(str(experiment), trainable, resume_errored=True), experiment)
                    missing = [i for i in incomplete() if i not in failed]  # runs that experiment did not cover
                if missing:
                    name = f"grid-{grid}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
                    experiment = storage_dir / name
                    atomic_write_json(storage_dir / _POINTER, {"experiment": name, "grid": grid, "state": "running",
                                                               "runs": missing})
                    _ACTIVE["total"] = len(missing)
                    fit(tune.Tuner(
                        trainable, param_space={"run": tune.grid_search(missing)},
                        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
                        run_config=tune.RunConfig(
                            name=name, storage_path=str(storage_dir), verbose=0, callbacks=[_progress_callback()],
                            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False))), experiment)
        trials.sort(key=lambda t: (t["run"] if isinstance(t["run"], int) else -1))

    rows = []
    for i, ((info, cfg), key) in enumerate(zip(runs, keys)):
        rec = store.load(key, study=cfg.study, name=cfg.name, complete_only=False)
        if rec is not None and rec.complete:
            rows.append({**info, "label": cfg.name, "run_dir": str(rec.run_dir), "record": rec})
            failed.pop(i, None)  # e.g. a leftover worker of a killed driver finished it meanwhile
            continue
        entry = failed.setdefault(i, {"run": i, "label": cfg.name, "seed": cfg.seed, "status": "MISSING",
                                      "error": "not complete in the results store"})
        if rec is not None:
            entry["run_dir"] = str(rec.run_dir)
            entry["store_state"] = rec.state
            if rec.status.get("error"):
                entry["store_error"] = rec.status["error"]
                entry["traceback"] = rec.status.get("traceback")
    out = write_tables(spec, rows, store, out_dir, quick, partial=bool(failed))
    nodes = {t["node_id"] for t in trials if t.get("node_id")}
    trained = sum(bool(t.get("trained")) for t in trials)
    print(f"study {spec.name} on Ray: {len(runs)} runs, {trained} trained now, {len(rows)} complete, "
          f"{len(failed)} failed, {len(nodes)} node(s), {time.perf_counter() - t0:.1f}s; tables in {out['out_dir']}",
          flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed (their error and traceback are in the run folder's status.json; the "
              "next call retries them):", flush=True)
        for _, f in sorted(failed.items()):
            msg = f.get("store_error") or _first_line(f.get("error"))
            print(f"  {f['label']} seed {f['seed']}: {msg}" + (f"  [{f['run_dir']}]" if f.get("run_dir") else ""),
                  flush=True)
    return {**out, "trials": trials, "failed": [failed[i] for i in sorted(failed)],
            "experiment": str(experiment) if experiment else None}


# --------------------------------------------------------------------------------------------
# Bench: speed-up of concurrent trials
# --------------------------------------------------------------------------------------------

#: A testbed small enough to build in well under a minute (used when the default one is not built).
TINY_TESTBED = {"num_sft": 400, "num_pref_train": 256, "num_pref_test": 64, "num_test": 64, "teacher_layers": 2,
                "teacher_hidden": 64, "teacher_intermediate": 128, "student_hidden": 32, "student_intermediate": 64,
                "teacher_sft_epochs": 2, "student_sft_epochs": 2, "samples_per_prompt": 2}


def _testbed_built(overrides: dict[str, Any] | None = None) -> bool:
    from tvkd.testbed.build import STAGE_FILE, TestbedConfig, stage_keys

    root = cache_root() / "testbed"
    return all((root / f"{stage}-{key}" / STAGE_FILE).is_file()
               for stage, key in stage_keys(TestbedConfig(**(overrides or {}))).items())


def bench_spec(testbed: str = "auto", quick: bool = True) -> tuple[dict[str, Any], str]:
    """The bench grid: reward-conflict's variants dpo and soft_value x seeds 0 and 1 (4 runs) with its
    ``--quick`` settings (``quick=False``: its full ones), on the default testbed when it is built
    (``testbed="auto"``) or forced (``"default"``), else on the small `TINY_TESTBED` (``"tiny"``).
    Returns (spec, which testbed)."""
    import copy

    from studies.runner import deep_merge

    if testbed not in ("auto", "default", "tiny"):
        raise ValueError(f"testbed must be auto, default or tiny, got {testbed!r}")
    which = testbed if testbed != "auto" else ("default" if _testbed_built() else "tiny")
    spec = copy.deepcopy(load_study("reward-conflict"))
    base = deep_merge(spec["base"], spec["quick"]["base"]) if quick else spec["base"]
    if which == "tiny":
        base = deep_merge(base, {"testbed": TINY_TESTBED, "data": {"test_limit": 32}})
    spec = {"name": "bench-ray", "table": None, "seeds": [0, 1], "base": base,
            "variants": [v for v in spec["variants"] if v["label"] in ("dpo", "soft_value")]}
    return spec, which


_SPIN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(15_000_000):\n    x += i\nprint(time.perf_counter() - t)"


def parallel_headroom(n: int = 2) -> float:
    """How much more CPU work this machine does right now with `n` busy processes than with one (at most `n`):
    the ceiling of any trial speed-up measured beside it (other people's jobs on a shared box lower it)."""
    import subprocess

    def wall(k: int) -> float:
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.DEVNULL) for _ in range(k)]
        for p in procs:
            p.wait()
        return time.perf_counter() - t

    return round(n * wall(1) / wall(n), 2)


def bench_ray_speedup(*, concurrency: tuple[int, ...] = (1, 2), testbed: str = "auto", quick: bool = True,
                      workdir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Wall time of the 4-run bench grid (`bench_spec`) through `run_study_ray` at each trial concurrency,
    each into a fresh results store and a fresh cache (the testbed shared), and the speed-up of the
    largest concurrency over 1. The testbed is built (or found) before the clocks start."""
    from tvkd.pipeline import identity

    spec, which = bench_spec(testbed, quick)
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tvkd-bench-ray-"))
    base.mkdir(parents=True, exist_ok=True)
    for _, cfg in expand_study(spec)[:1]:
        identity(cfg, progress=progress)  # build (or find) the testbed outside the timings
    shared_testbed = (cache_root() / "testbed").resolve()
    old_cache = os.environ.get("TVKD_CACHE")
    wall: dict[int, float] = {}
    try:
        for n in concurrency:
            cache = base / f"cache-{n}"
            cache.mkdir(parents=True, exist_ok=True)
            if not (cache / "testbed").exists():
                (cache / "testbed").symlink_to(shared_testbed, target_is_directory=True)
            os.environ["TVKD_CACHE"] = str(cache)  # teacher / reference caches are built in each measurement
            t = time.perf_counter()
            out = run_study_ray(spec, results=base / f"results-{n}", max_concurrent=n, progress=progress)
            wall[n] = round(time.perf_counter() - t, 2)
            if out["failed"]:
                raise RuntimeError(f"bench grid at {n} concurrent trials: {len(out['failed'])} run(s) failed: "
                                   + "; ".join(str(f.get("store_error") or f.get("error")) for f in out["failed"]))
    finally:
        if old_cache is None:
            os.environ.pop("TVKD_CACHE", None)
        else:
            os.environ["TVKD_CACHE"] = old_cache
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    top = max(concurrency)
    headroom = parallel_headroom(top)
    result = {"grid": f"reward-conflict{' --quick' if quick else ''}: dpo + soft_value x seeds 0, 1 (4 runs)",
              "testbed": which,
              "cpus": cpus, "wall_s": wall, "speedup": round(wall[1] / wall[top], 2) if 1 in wall else None,
              "concurrency": top, "parallel_headroom": headroom}
    print(f"bench ray: 4-run grid on the {which} testbed, {cpus} CPUs: "
          + ", ".join(f"{n} at once {w:.1f}s" for n, w in wall.items())
          + (f"; speed-up at {top}: {result['speedup']:.2f}x" if result["speedup"] else "")
          + f" (this machine's own headroom for {top} busy processes right now: {headroom:.2f}x)", flush=True)
    return result
