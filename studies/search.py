"""Hyperparameter search over one run config: Optuna (TPE, median pruning), optionally through Ray Tune.

A search spec is a YAML file (or dict) with a base run config and a ``search`` block::

    # tvkd study search studies/examples/alpha_search.yaml
    name: alpha-search                     # the Optuna study name, and the results-store study
    description: "..."
    base:                                  # a run config, as in `tvkd run` (name/study are set per trial)
      models: {student: "testbed:student_sft", teacher: "testbed:teacher_dpo"}
      loss: {name: tvkd, aux: soft_value, alpha: 0.7}
      train: {num_train_epochs: 1, logging_steps: 10}
    search:
      params:                              # dotted run-config keys (loss.X is a loss option)
        loss.alpha: {low: 0.05, high: 2.0, log: true}        # float (low/high floats)
        train.per_device_train_batch_size: {low: 8, high: 32, step: 8}  # int (low/high ints)
        loss.aux: {choices: [soft_value, log_prob]}           # categorical (str/int/float/bool/null)
      metric: oracle_score                 # a key of the run's metrics.json
      direction: maximize                  # maximize | minimize
      n_trials: 8                          # completed + pruned trials (failed ones do not count)
      sampler: {name: tpe, seed: 0, n_startup_trials: 4}      # or `tpe` / `random`; other keys go to
                                                              # optuna's TPESampler
      pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 20}  # or `none`; steps = trainer steps
      intermediate: train/loss             # or {metric: train/loss, direction: minimize}: a key the trainer
                                           # logs every train.logging_steps (`loss`, `reward_accuracy`, ...)
      max_failures: 3                      # trials that raise (not pruned) before the search gives up

What a search does
  * Every trial builds a run config from ``base`` plus its sampled params, named ``<study>-trial<k>``
    (study ``<study>``), and runs it through `tvkd.pipeline.execute`: same results store, same
    content-addressed runs. It returns the run's ``metric``.
  * Pruning: `PruningCallback` (a ``transformers.TrainerCallback``) reports ``intermediate`` at every
    logging step (``trial.report(value, step)``) and raises ``optuna.TrialPruned`` when the pruner says
    so. The pipeline records that run as *failed* ("TrialPruned: ...", never complete) and re-raises;
    the search tells Optuna the trial was PRUNED and goes on. An intermediate whose direction differs
    from the study's (``train/loss`` while maximizing ``oracle_score``) is reported negated, so the
    median pruner compares it the right way round (the study's user attrs say so). Pick one whose
    scale does not move with the searched params: the TVKD loss value grows with α, so an α search
    pruned on train/loss favours small α (studies/examples/alpha_search.yaml uses reward_accuracy).
  * Storage: an Optuna RDB storage, SQLite by default (``sqlite:///<results>/.optuna/<study>.db``),
    any SQLAlchemy URL otherwise (``--storage postgresql://...``); the study is loaded if it exists.
    A killed search resumes: the completed and pruned trials in the storage count against
    ``n_trials`` and are never rerun; a trial left RUNNING by a dead process (same host: its pid is
    gone; other hosts: no heartbeat for `GRACE_PERIOD` s; no owner `ORPHAN_GRACE` s after it was asked:
    killed between `ask` and marking it) is marked FAIL and re-queued once or twice
    with the same params and run name, so its run resumes from its checkpoint (if it kept one) or is
    found complete in the store (a trial stopped by Ctrl-C / SIGTERM is re-queued the same way;
    the run name is part of a run's identity, hence the reuse). Several processes may work on one storage at once (each counts the
    live trials of the others). The storage remembers the search (base, params, metric, direction,
    intermediate): resuming with a changed spec is an error (use another study name).
  * The sampler is seeded with ``seed + <trials already in the storage>``: an uninterrupted search is
    reproducible, and a resumed one does not redraw the points of the first process.
  * ``backend="ray"`` (``--backend ray [--address HOST:PORT]``): the same trials through Ray Tune in the one
    Ray session of `studies.ray_session`, each reserving the study file's ``resources`` (`ray.tune.Tuner` with `OptunaSearch` on the
    same storage, `ConcurrencyLimiter(max_concurrent)`, and Ray's `MedianStoppingRule` on the
    intermediate metric instead of Optuna's pruner, which `OptunaSearch` does not run; its grace
    period is n_warmup_steps / train.logging_steps reports). A trial that fails there is not
    replaced within the call (rerun to fill the storage up to n_trials). Note that
    `OptunaSearch` rejects ``tune.grid_search`` in a search space: a grid belongs in a study's
    ``variants`` / ``axes``; here use ``choices``.
  * At the end the best trial's run config is written to ``<results>/<study>/best.yaml`` (first line:
    the ``tvkd run`` command that runs it; as written it is that trial's own config, so the command
    finds its run in the store), and, as every study ends (`studies.engine.write_outputs`), runs.csv
    with one row per trial (its params, its run's config and metrics) under ``<results>/<study>/tables``.

Entry points: `search_study` (Python), `add_search_arguments` + `cli_search` (for ``tvkd study
search``), and ``python -m studies.search SPEC [--storage URL] [--n-trials N]``.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.engine import load, write_outputs
from studies.ray_session import check_reachable, ray_session
from studies.spec import Resources, StudyFile
from tvkd.api import ConfigError, build_config
from tvkd.config import config_from_dict, dump_config
from tvkd.paths import atomic_write_text, fingerprint, results_root
from tvkd.results import ResultsStore, redact

if TYPE_CHECKING:
    from tvkd.config import RunConfig

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
HEARTBEAT_INTERVAL = 30  # s: how often a running trial's owner says it is alive (RDB heartbeat table)
GRACE_PERIOD = 300  # s without a heartbeat before another host's RUNNING trial counts as dead
ORPHAN_GRACE = 60  # s: a RUNNING trial with no owner this long after it started was left by a process killed
# between `study.ask` and marking the trial its own (milliseconds apart); younger ones may still get an owner
MAX_RETRIES = 2  # re-queues of a trial whose process died, before it is left failed
OWNER_ATTR, RETRIES_ATTR = "tvkd:owner", "tvkd:retries"
SEARCH_ATTR, INTERMEDIATE_ATTR = "tvkd:search", "tvkd:intermediate"
SEARCH_KEYS = {"params", "metric", "direction", "n_trials", "sampler", "pruner", "intermediate", "max_failures"}
RUN_NAME_KEYS = {"name", "study"}
# Light at import (argparse wiring of the CLI imports this module): torch, transformers, optuna and
# ray are imported where they are used.


def _config_error(message: str) -> Exception:
    """A `tvkd.api.ConfigError` (a ValueError: the CLI prints it as one `error:` line)."""
    return ConfigError(message)


# --------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------


@dataclass
class SearchSpec:
    name: str
    base: dict[str, Any]
    params: dict[str, Any]  # dotted key -> optuna distribution
    metric: str
    direction: str
    n_trials: int
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    intermediate: str | None = None
    intermediate_direction: str | None = None
    max_failures: int = 3
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def intermediate_sign(self) -> float:
        """+1 when the intermediate improves the way the metric does, -1 when it is reported negated."""
        return 1.0 if self.intermediate_direction in (None, self.direction) else -1.0

    def identity(self) -> dict[str, Any]:
        """What makes the trials in a storage comparable: resuming with anything else changed is an error."""
        from optuna.distributions import distribution_to_json

        return {"base": self.base, "params": {k: distribution_to_json(d) for k, d in sorted(self.params.items())},
                "metric": self.metric, "direction": self.direction,
                "intermediate": [self.intermediate, self.intermediate_direction]}

    def make_sampler(self, offset: int = 0):
        import optuna

        opts = {k: v for k, v in self.sampler.items() if k != "name"}
        seed = opts.pop("seed", 0)
        seed = None if seed is None else int(seed) + offset
        try:
            if self.sampler["name"] == "random":
                return optuna.samplers.RandomSampler(seed=seed, **opts)
            return optuna.samplers.TPESampler(seed=seed, **opts)
        except TypeError as e:
            raise _config_error(f"search {self.name}: sampler: {e}") from None

    def make_pruner(self):
        import optuna

        opts = {k: v for k, v in self.pruner.items() if k != "name"}
        if self.pruner["name"] == "none":
            return optuna.pruners.NopPruner()
        try:
            return optuna.pruners.MedianPruner(**opts)
        except TypeError as e:
            raise _config_error(f"search {self.name}: pruner: {e}") from None


def _number(value: Any, where: str) -> int | float:
    if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise _config_error(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _config_error(f"{where}: {value!r} is not a number")
    return value


def _distribution(key: str, spec: Any, where: str):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    w = f"{where}: search.params.{key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise _config_error(f"{w}: give a range {{low, high, log}} or {{choices: [...]}}, got {spec!r}")
    if "grid_search" in spec:
        raise _config_error(f"{w}: grid_search is a Ray Tune grid, and Ray's OptunaSearch rejects it; sample from "
                          "{choices: [...]} here, or put a grid in a study's variants (tvkd study run)")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        choices = spec["choices"]
        if extra or not isinstance(choices, list) or not choices:
            raise _config_error(f"{w}: choices must be a non-empty list (and alone), got {spec!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise _config_error(f"{w}: choice {c!r} is not a str, number, bool or null (Optuna stores choices "
                                  "as such); sample a name and map it in the config instead")
        return CategoricalDistribution(choices)
    unknown = set(spec) - {"low", "high", "log", "step", "type"}
    if unknown or "low" not in spec or "high" not in spec:
        raise _config_error(f"{w}: a range has low, high and optionally log, step, type (int|float); got {spec!r}")
    low, high = _number(spec["low"], f"{w}.low"), _number(spec["high"], f"{w}.high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _config_error(f"{w}.log: true or false, got {log!r}")
    kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise _config_error(f"{w}.type: int or float, got {kind!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{w}.step")
    if not low < high:
        raise _config_error(f"{w}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise _config_error(f"{w}: a log range needs low > 0, got {low}")
    try:
        if kind == "int":
            if low != int(low) or high != int(high):
                raise _config_error(f"{w}: an int range needs int bounds, got {low}..{high}")
            return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    except ValueError as e:
        raise _config_error(f"{w}: {e}") from None


def parse_search_spec(raw: dict[str, Any], where: str = "search spec") -> SearchSpec:
    """A checked `SearchSpec`: every param range, metric, sampler and pruner, and the params' keys
    against the run config (each range end builds a valid run config, loss options included)."""
    if not isinstance(raw, dict):
        raise _config_error(f"{where}: the top level must be a mapping (name, base, search), got {raw!r:.60}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _config_error(f"{where}: give the search a `name` (the Optuna study and the results-store study)")
    where = f"{where} ({name})"
    search = raw.get("search")
    if not isinstance(search, dict):
        hint = " (this is a grid study: run it with `tvkd study run`)" if "variants" in raw else ""
        raise _config_error(f"{where}: no `search` block{hint}; a search spec has base: <run config> and "
                          "search: {params, metric, direction, n_trials, ...}")
    unknown = set(search) - SEARCH_KEYS
    if unknown:
        raise _config_error(f"{where}: search has no key(s) {sorted(unknown)}; valid: {sorted(SEARCH_KEYS)}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise _config_error(f"{where}: base must be a run config mapping, got {base!r:.60}")
    params_raw = search.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise _config_error(f"{where}: search.params must map dotted run-config keys to ranges, e.g. "
                          "{loss.alpha: {low: 0.05, high: 2.0, log: true}}")
    params = {}
    for key, spec in params_raw.items():
        if key.split(".")[0] in RUN_NAME_KEYS:
            raise _config_error(f"{where}: search.params.{key}: the search sets name and study itself")
        params[str(key)] = _distribution(str(key), spec, where)
    metric = search.get("metric")
    if not isinstance(metric, str) or not metric:
        raise _config_error(f"{where}: search.metric: a key of the run's metrics.json, e.g. oracle_score")
    direction = search.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise _config_error(f"{where}: search.direction: maximize or minimize, got {direction!r}")
    n_trials = search.get("n_trials", 20)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise _config_error(f"{where}: search.n_trials must be a positive int, got {n_trials!r}")
    sampler = search.get("sampler", "tpe")
    sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler or {"name": "tpe"})
    sampler.setdefault("name", "tpe")
    sampler.setdefault("seed", 0)
    if sampler["name"] not in SAMPLERS:
        raise _config_error(f"{where}: search.sampler: one of {SAMPLERS}, got {sampler['name']!r}")
    pruner = search.get("pruner", "none")
    pruner = {"name": "none" if pruner is None else pruner} if not isinstance(pruner, dict) else dict(pruner)
    pruner.setdefault("name", "median")
    if pruner["name"] not in PRUNERS:
        raise _config_error(f"{where}: search.pruner: one of {PRUNERS}, got {pruner['name']!r}")
    inter = search.get("intermediate")
    inter_dir = None
    if isinstance(inter, dict):
        extra = set(inter) - {"metric", "direction"}
        if extra or not isinstance(inter.get("metric"), str):
            raise _config_error(f"{where}: search.intermediate: a logged key, or {{metric: <key>, direction: ...}}, "
                              f"got {inter!r}")
        inter, inter_dir = inter["metric"], inter.get("direction")
    elif inter is not None and not isinstance(inter, str):
        raise _config_error(f"{where}: search.intermediate: a key the trainer logs (e.g. train/loss), got {inter!r}")
    if inter is not None:
        inter_dir = inter_dir or ("minimize" if inter.split("/")[-1].endswith("loss") else direction)
        if inter_dir not in DIRECTIONS:
            raise _config_error(f"{where}: search.intermediate.direction: maximize or minimize, got {inter_dir!r}")
    if pruner["name"] != "none" and inter is None:
        raise _config_error(f"{where}: pruner {pruner['name']!r} needs search.intermediate: a metric the trainer "
                          "logs during training (e.g. train/loss, reward_accuracy)")
    max_failures = search.get("max_failures", 3)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1:
        raise _config_error(f"{where}: search.max_failures must be a positive int, got {max_failures!r}")
    spec = SearchSpec(name=name, base=base, params=params, metric=metric, direction=direction, n_trials=n_trials,
                      sampler=sampler, pruner=pruner, intermediate=inter, intermediate_direction=inter_dir,
                      max_failures=max_failures, raw=raw)
    spec.make_sampler()
    spec.make_pruner()
    _check_params_build(spec, where)
    return spec


def _ends(dist) -> list[Any]:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def _probe_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """The low end of every range (first choice), then each other end (choice) of each param in turn."""
    probe = {k: _ends(d)[0] for k, d in spec.params.items()}
    points = [dict(probe)]
    for k, d in spec.params.items():
        points += [{**probe, k: v} for v in _ends(d)[1:]]
    return points


def _probe_configs(spec: SearchSpec, where: str | None = None):
    for point in _probe_points(spec):
        yield trial_config(spec, point, run_name=f"{spec.name}-check", study=spec.name, where=where)


def _check_params_build(spec: SearchSpec, where: str) -> None:
    """Each end of each range (every choice) gives a valid run config with valid loss options."""
    from tvkd.losses import LOSSES  # lazy: torch (the losses)

    for point in _probe_points(spec):
        try:
            cfg = trial_config(spec, point, run_name=f"{spec.name}-check", study=spec.name, where="base")
            build_config(LOSSES.get(cfg.loss.name), cfg.loss.options, where="loss")
        except (ConfigError, KeyError, ValueError) as e:
            at = ", ".join(f"{k}={v!r}" for k, v in point.items())
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise _config_error(f"{where}: with {at}: {msg}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "loss" and len(parts) == 2 and parts[1] not in ("name", "options") \
            and isinstance(data.get("loss"), dict) and "options" in data["loss"]:
        parts = ["loss", "options", parts[1]]  # `loss: {name, options: {...}}` form
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise _config_error(f"search.params.{key}: {'.'.join(parts[:i + 1])} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def trial_config(spec: SearchSpec, params: dict[str, Any], *, run_name: str, study: str,
                 where: str | None = None) -> RunConfig:
    """The run config of one trial: ``base`` + the params (dotted keys), named `run_name` in `study`."""
    data = copy.deepcopy(spec.base)
    for key, value in params.items():
        _set_dotted(data, key, value)
    data.update(name=run_name, study=study)
    return config_from_dict(data, where=where or f"search {spec.name} {run_name}")


# --------------------------------------------------------------------------------------------
# Trainer callbacks: intermediate values to the trial (pruning) or to Ray
# --------------------------------------------------------------------------------------------


def log_value(logs: dict[str, Any] | None, key: str) -> float | None:
    """`key` from a trainer log line: ``train/loss`` matches the trainer's ``loss`` (and vice versa)."""
    if not logs:
        return None
    for k in (key, key.removeprefix("train/"), f"train/{key}"):
        v = logs.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


_CALLBACKS: dict[str, type] = {}


def _callback_classes() -> dict[str, type]:
    """`PruningCallback` and `RayReportCallback`, defined on first use (they subclass transformers'
    TrainerCallback, and this module stays light to import); also `studies.search.PruningCallback`."""
    if _CALLBACKS:
        return _CALLBACKS
    from transformers import TrainerCallback

    class _IntermediateCallback(TrainerCallback):
        def __init__(self, key: str):
            self.key = key
            self.run_dir: Path | None = None
            self.last: tuple[int, float] | None = None
            self.seen: set[str] = set()

        def on_train_begin(self, args, state, control, **kwargs):
            self.run_dir = Path(args.output_dir).parent  # execute trains into <run dir>/checkpoint

        def on_log(self, args, state, control, logs=None, **kwargs):
            value = log_value(logs, self.key)
            self.seen.update(logs or {})
            if value is None:
                return
            self.last = (int(state.global_step), value)
            self.intermediate(int(state.global_step), value)

        def on_train_end(self, args, state, control, **kwargs):
            if self.last is None:
                print(f"  warning: {self.key!r} never appeared in the trainer's logs (it logs {sorted(self.seen)}); "
                      "nothing was reported for pruning", flush=True)

        def intermediate(self, step: int, value: float) -> None:  # pragma: no cover - overridden
            raise NotImplementedError

    class PruningCallback(_IntermediateCallback):
        """Reports `key` from every trainer log to an Optuna trial; raises ``optuna.TrialPruned`` when it should stop.

        `sign` -1 reports the value negated (an intermediate that improves the other way than the study).
        The exception leaves the trainer, and `execute` records the run as failed ("TrialPruned: ...")
        before it re-raises; the search catches it and tells the study the trial was pruned.
        """

        def __init__(self, trial: Any, key: str, sign: float = 1.0):
            super().__init__(key)
            self.trial, self.sign = trial, sign

        def intermediate(self, step: int, value: float) -> None:
            import optuna

            self.trial.report(self.sign * value, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"trial {self.trial.number} pruned at step {step}: {self.key}={value:.4g} "
                                         "is worse than the median of earlier trials at this step")

    class RayReportCallback(_IntermediateCallback):
        """Reports `key` to Ray Tune at each log (`ray.tune.report`) for its trial scheduler (median stopping)."""

        def __init__(self, key: str, metric: str):
            super().__init__(key)
            self.metric = metric

        def intermediate(self, step: int, value: float) -> None:
            from ray import tune

            tune.report({self.metric: math.nan, "intermediate_value": value, "trainer_step": step, "final": False})

    for cls in (PruningCallback, RayReportCallback):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _CALLBACKS[cls.__name__] = cls
    return _CALLBACKS


# --------------------------------------------------------------------------------------------
# Storage, owners of running trials, stale trials
# --------------------------------------------------------------------------------------------


def default_storage(results: Path, study: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study)
    path = (Path(results) / ".optuna" / f"{safe}.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str):
    """An Optuna RDB storage (SQLite waits on a locked file instead of failing) with heartbeats."""
    import optuna
    import sqlalchemy.exc  # lazy: optuna's database layer

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    example = "e.g. sqlite:////abs/path/search.db or postgresql://user@host/db"
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                                          grace_period=GRACE_PERIOD, heartbeat_stale_trial_callback=_requeue)
    except sqlalchemy.exc.ArgumentError:
        raise _config_error(f"--storage {url!r}: not a database URL ({example})") from None
    except ImportError:  # optuna turns a missing driver into this
        scheme = url.split(":", 1)[0]
        raise _config_error(f"--storage {url!r}: no database driver for {scheme!r} is installed (e.g. psycopg2 for "
                            f"postgresql, pymysql for mysql+pymysql://); or use a SQLite file ({example})") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        why = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
        raise _config_error(f"--storage {url!r}: cannot open the database ({why}); check the path or the server, "
                            "and that this user may write there") from None


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux /proc), to tell a reused pid from the original owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _owner_state(owner: Any, me: dict[str, Any]) -> str:
    """"me", "dead", "alive" or "unknown" (no owner, or another host: left to the heartbeat)."""
    if not isinstance(owner, dict) or owner.get("host") != me["host"]:
        return "unknown"
    pid = owner.get("pid")
    if pid == me["pid"] and owner.get("start") == me["start"]:
        return "me"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "dead"
    except (PermissionError, TypeError, ValueError):
        return "alive" if isinstance(pid, int) else "unknown"
    start = _process_start(int(pid))
    return "dead" if owner.get("start") and start and start != owner.get("start") else "alive"


def _requeue(study: Any, trial: Any) -> None:
    """Queue a trial that was cut short (its process died, or Ctrl-C) again, with its params and run name,
    so its run resumes (or is found complete); at most `MAX_RETRIES` times."""
    retries = int(trial.user_attrs.get(RETRIES_ATTR, 0))
    run_name = trial.user_attrs.get("run_name")
    if not trial.params and run_name is None:  # killed inside `ask`: no run began, a fresh trial takes its place
        print(f"  trial {trial.number} was cut short before it had params: marked failed", flush=True)
        return
    if retries >= MAX_RETRIES:
        print(f"  trial {trial.number} ({run_name}) was cut short {retries + 1} times; left failed", flush=True)
        return
    study.enqueue_trial(trial.params, user_attrs={"run_name": run_name, RETRIES_ATTR: retries + 1,
                                                   "tvkd:retry_of": trial.number})
    print(f"  trial {trial.number} ({run_name}) did not finish: marked failed and queued again (same params, "
          "same run)", flush=True)


def reclaim_stale(study: Any, me: dict[str, Any], active: set[int]) -> tuple[int, int]:
    """Fail and re-queue RUNNING trials whose process is gone. Returns (others, orphans): how many
    RUNNING trials other live processes hold, and how many of those have no owner yet (asked less than
    `ORPHAN_GRACE` s ago; older ones were left by a process killed right after `ask` and are reclaimed)."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)  # other hosts: no heartbeat within GRACE_PERIOD
    others = orphans = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        state = _owner_state(owner, me)
        orphan = owner is None and t._trial_id not in active
        old = t.datetime_start is None or (now - t.datetime_start).total_seconds() > ORPHAN_GRACE
        if state == "dead" or (state == "me" and t._trial_id not in active) or (orphan and old):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # another process got there first
                continue
            _requeue(study, t)
        elif state == "alive" or (state == "unknown" and OWNER_ATTR in t.user_attrs):
            others += 1
        elif orphan:
            others, orphans = others + 1, orphans + 1
    return others, orphans


def _settled(study: Any, me: dict[str, Any], active: set[int]) -> int:
    """`reclaim_stale` once no trial is waiting for its owner (at most `ORPHAN_GRACE` s): the number of
    live trials other processes hold."""
    while True:
        others, orphans = reclaim_stale(study, me, active)
        if not orphans:
            return others
        time.sleep(1.0)


class _Heartbeat:
    """Records a heartbeat for each trial this process runs, every `HEARTBEAT_INTERVAL` seconds."""

    def __init__(self, storage: Any):
        self.storage, self.ids = storage, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tvkd-search-heartbeat")
        self._thread.start()

    def add(self, trial_id: int) -> None:
        self.ids.add(trial_id)
        self._beat(trial_id)

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception:  # noqa: BLE001 - a missed heartbeat only delays nothing here
            pass

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            for trial_id in list(self.ids):
                self._beat(trial_id)

    def close(self) -> None:
        self._stop.set()

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles its searcher (with this): a copy is inert
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.storage, self.ids, self._stop, self._thread = None, set(), threading.Event(), None


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    spec: SearchSpec
    study_name: str
    results: Path
    storage_url: str
    n_trials: int
    progress: bool
    me: dict[str, Any]
    resources: Resources = field(default_factory=Resources)


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _best(study: Any) -> Any:
    from optuna.trial import TrialState

    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def _metric_value(rec: Any, metric: str) -> float:
    value = rec.metrics.get(metric)
    if value is None:
        numeric = sorted(k for k, v in rec.metrics.items() if isinstance(v, (int, float)))
        raise _config_error(f"search.metric {metric!r} is not in {rec.run_dir / 'metrics.json'}; it has {numeric}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _config_error(f"search.metric {metric!r} is {value!r} in {rec.run_dir / 'metrics.json'}, not a number")
    return float(value)


def _open_study(ctx: _Context, storage: Any) -> Any:
    import optuna

    spec = ctx.spec
    study = optuna.create_study(study_name=ctx.study_name, storage=storage, direction=spec.direction,
                                load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise _config_error(f"the storage's study {ctx.study_name!r} {study.direction.name.lower()}s, the spec says "
                          f"{spec.direction}; use another study name (--study-name) or storage")
    ident = spec.identity()
    digest = fingerprint(ident)
    stored = study.user_attrs.get(SEARCH_ATTR)
    if stored is None:
        study.set_user_attr(SEARCH_ATTR, {"digest": digest, **ident})
        study.set_user_attr(INTERMEDIATE_ATTR, {
            "metric": spec.intermediate, "direction": spec.intermediate_direction,
            "reported_as": "value" if spec.intermediate_sign > 0 else "-value"})
    elif stored.get("digest") != digest:
        changed = [k for k in ident if fingerprint(ident[k]) != fingerprint(stored.get(k))]
        raise _config_error(f"the storage's study {ctx.study_name!r} was searched with another spec (changed: "
                          f"{', '.join(changed) or 'format'}); its trials are not comparable. Use another study "
                          "name (--study-name) or storage, or restore the spec")
    n_existing = len(study.get_trials(deepcopy=False))
    return optuna.load_study(study_name=ctx.study_name, storage=storage,
                             sampler=spec.make_sampler(offset=n_existing), pruner=spec.make_pruner())


def _trial_line(ctx: _Context, study: Any, k: int, number: int, run_name: str, params: dict, outcome: str) -> None:
    if not ctx.progress:
        return
    best = _best(study)
    tail = f"  (best {best.value:.4g}, trial {best.number})" if best is not None else ""
    print(f"[{k}/{ctx.n_trials}] trial {number} {run_name} ({_fmt(params)}): {outcome}{tail}", flush=True)


def _run_local(ctx: _Context, study: Any, storage: Any) -> None:
    """Trials one after another in this process (ask and tell), until n_trials are complete or pruned."""
    import optuna
    from optuna.trial import TrialState

    from tvkd.pipeline import InputError, execute  # lazy: torch, transformers

    spec, store = ctx.spec, ResultsStore(ctx.results)
    failures, beat = 0, _Heartbeat(storage)
    try:
        while True:
            others, orphans = reclaim_stale(study, ctx.me, beat.ids)
            done = len(_finished(study))
            if done + others >= ctx.n_trials:
                if orphans and done + others - orphans < ctx.n_trials:  # wait: owned soon, or reclaimed
                    time.sleep(1.0)
                    continue
                break
            trial = study.ask(spec.params)
            run_name = trial.user_attrs.get("run_name") or f"{ctx.study_name}-trial{trial.number}"
            trial.set_user_attr("run_name", run_name)
            trial.set_user_attr(OWNER_ATTR, ctx.me)
            beat.add(trial._trial_id)
            k = done + 1
            callbacks = []
            if spec.intermediate:
                callbacks.append(_callback_classes()["PruningCallback"](trial, spec.intermediate, spec.intermediate_sign))
            try:
                cfg = trial_config(spec, trial.params, run_name=run_name, study=ctx.study_name)
                if ctx.progress:
                    print(f"[{k}/{ctx.n_trials}] trial {trial.number} {run_name}: {_fmt(trial.params)}", flush=True)
                rec = execute(cfg, store=store, progress=ctx.progress, callbacks=callbacks)
                trial.set_user_attr("run_dir", str(rec.run_dir))
                value = _metric_value(rec, spec.metric)
            except optuna.TrialPruned as e:
                if callbacks and callbacks[0].run_dir is not None:
                    trial.set_user_attr("run_dir", str(callbacks[0].run_dir))
                trial.set_user_attr("pruned", str(e))
                study.tell(trial, state=TrialState.PRUNED)
                _trial_line(ctx, study, k, trial.number, run_name, trial.params, f"pruned ({e})")
                continue
            except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the run is marked interrupted; a resume redoes it first
                study.tell(trial, state=TrialState.FAIL)
                _requeue(study, trial)
                raise
            except (ConfigError, InputError):
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                _trial_line(ctx, study, k, trial.number, run_name, trial.params,
                            f"failed ({type(e).__name__}: {e}) [{failures}/{spec.max_failures} failures]")
                if failures >= spec.max_failures:
                    raise
                continue
            finally:
                beat.ids.discard(trial._trial_id)
            if not math.isfinite(value):
                trial.set_user_attr("error", f"{spec.metric} is {value}")
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                _trial_line(ctx, study, k, trial.number, run_name, trial.params,
                            f"{spec.metric}={value}: failed [{failures}/{spec.max_failures} failures]")
                if failures >= spec.max_failures:
                    raise ValueError(f"search {ctx.study_name}: {spec.metric} was {value} in {failures} trials; "
                                     f"see {rec.run_dir / 'metrics.json'}")
                continue
            study.tell(trial, value)
            _trial_line(ctx, study, k, trial.number, run_name, trial.params, f"{spec.metric}={value:.4g}")
    finally:
        beat.close()


# ---- Ray Tune ------------------------------------------------------------------------------


def _ray_trial(config: dict[str, Any], ctx: _Context) -> None:
    """One Ray Tune trial: the run of the sampled params; reports intermediates, then the metric."""
    from ray import tune

    from tvkd.pipeline import execute  # lazy: torch, transformers

    spec = ctx.spec
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = trial_config(spec, params, run_name=config["_run_name"], study=ctx.study_name)
    callbacks = [_callback_classes()["RayReportCallback"](spec.intermediate, spec.metric)] if spec.intermediate else []
    rec = execute(cfg, store=ResultsStore(ctx.results), progress=ctx.progress, callbacks=callbacks)
    last = callbacks[0].last[1] if callbacks and callbacks[0].last else math.nan
    tune.report({spec.metric: _metric_value(rec, spec.metric), "intermediate_value": last, "final": True,
                 "run_dir": str(rec.run_dir)})


_RAY_SEARCHER: type | None = None


def _ray_searcher_class() -> type:
    """`OptunaSearch` that names each run after its Optuna trial, marks owners, and tells pruned/failed apart."""
    global _RAY_SEARCHER
    if _RAY_SEARCHER is not None:
        return _RAY_SEARCHER
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class NumberedOptunaSearch(OptunaSearch):
        def __init__(self, *args: Any, tvkd_ctx: _Context, heartbeat: _Heartbeat, done: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._tvkd, self._beat, self._done = tvkd_ctx, heartbeat, done
            self._reported: dict[str, set[int]] = {}

        def suggest(self, trial_id: str) -> dict | None:
            config = super().suggest(trial_id)
            if config is None:
                return None
            ot = self._ot_trials[trial_id]
            run_name = ot.user_attrs.get("run_name") or f"{self._tvkd.study_name}-trial{ot.number}"
            ot.set_user_attr("run_name", run_name)
            ot.set_user_attr(OWNER_ATTR, self._tvkd.me)
            self._beat.add(ot._trial_id)
            return {**config, "_trial_number": ot.number, "_run_name": run_name}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            value = result.get("intermediate_value")
            ot = self._ot_trials.get(trial_id)
            step = int(result.get("trainer_step", 0))
            seen = self._reported.setdefault(trial_id, set())  # Ray may hand a result over twice
            if ot is not None and not result.get("final") and isinstance(value, float) and math.isfinite(value) \
                    and step not in seen:
                seen.add(step)
                ot.report(self._tvkd.spec.intermediate_sign * value, step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ctx, ot = self._tvkd, self._ot_trials[trial_id]
            result = result or {}
            value = result.get(ctx.spec.metric) if result.get("final") else None
            if result.get("run_dir"):
                ot.set_user_attr("run_dir", result["run_dir"])
            if value is not None and math.isfinite(value):
                state, outcome = TrialState.COMPLETE, f"{ctx.spec.metric}={value:.4g}"
            elif error or result.get("final"):
                state, value, outcome = TrialState.FAIL, None, "failed (see the Ray trial's error)"
            else:
                state, value, outcome = TrialState.PRUNED, None, "pruned (median stopping rule)"
            try:
                self._ot_study.tell(ot, value, state=state)
            except Exception as e:  # noqa: BLE001 - as OptunaSearch does: a bad value must not stop Tune
                print(f"  could not record trial {ot.number}: {e}", flush=True)
            self._beat.ids.discard(ot._trial_id)
            self._completed_trials.add(trial_id)
            self._done += state != TrialState.FAIL
            _trial_line(ctx, self._ot_study, self._done, ot.number, ot.user_attrs.get("run_name", "?"),
                        ot.params, outcome)

    NumberedOptunaSearch.__module__ = __name__
    NumberedOptunaSearch.__qualname__ = "NumberedOptunaSearch"
    _RAY_SEARCHER = NumberedOptunaSearch
    return NumberedOptunaSearch


def __getattr__(name: str) -> Any:  # classes defined on first use (Ray pickles its searcher by reference)
    if name == "NumberedOptunaSearch":
        return _ray_searcher_class()
    if name in ("PruningCallback", "RayReportCallback"):
        return _callback_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_ray(ctx: _Context, study: Any, storage: Any, max_concurrent: int) -> None:
    """The remaining trials through `ray.tune.Tuner` with `OptunaSearch` on the same Optuna storage.

    Pruning is Ray's `MedianStoppingRule` on the intermediate value (OptunaSearch runs no Optuna
    pruner); a stopped trial is told to Optuna as PRUNED. `OptunaSearch` rejects `tune.grid_search`.
    Ray samples exactly the missing number of trials: one that fails (an error, not a prune) leaves
    the storage short of n_trials, and the next call fills it up. Each call is a new Ray experiment
    (`<results>/.ray/<study>-<time>`); the Optuna storage is what a search resumes from.
    """
    from ray import tune  # lazy: ray
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule
    from ray.tune.search import ConcurrencyLimiter

    spec = ctx.spec
    beat = _Heartbeat(storage)
    others = _settled(study, ctx.me, beat.ids)
    done = len(_finished(study))
    remaining = ctx.n_trials - done - others
    if remaining <= 0:
        beat.close()
        return
    try:
        searcher = _ray_searcher_class()(
            dict(spec.params), metric=spec.metric, mode=spec.direction[:3], sampler=study.sampler,
            study_name=ctx.study_name, storage=storage, tvkd_ctx=ctx, heartbeat=beat, done=done)
        scheduler = FIFOScheduler()
        if spec.pruner["name"] == "median":
            p = spec.pruner  # Ray's steps are reports (one per trainer log), Optuna's are trainer steps
            logging_steps = next(iter(_probe_configs(spec))).train.logging_steps
            scheduler = MedianStoppingRule(
                time_attr="training_iteration", metric="intermediate_value",
                mode=(spec.intermediate_direction or spec.direction)[:3],
                grace_period=float(p.get("n_warmup_steps", 0)) / logging_steps,
                min_samples_required=int(p.get("n_startup_trials", 5)), hard_stop=True)
        trainable = tune.with_resources(tune.with_parameters(_ray_trial, ctx=ctx), ctx.resources.as_tune())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                        scheduler=scheduler, num_samples=remaining),
            run_config=tune.RunConfig(name=f"{ctx.study_name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str((ctx.results / ".ray").resolve()),
                                      verbose=1 if ctx.progress else 0,
                                      failure_config=tune.FailureConfig(fail_fast=False)))
        grid = tuner.fit()
        if grid.errors and ctx.progress:
            print(f"ray: {len(grid.errors)} trial(s) failed: {[str(e)[:200] for e in grid.errors]}", flush=True)
    finally:
        beat.close()


# ---- entry point ---------------------------------------------------------------------------


def search_study(spec_or_path: str | Path | dict[str, Any] | StudyFile, *, n_trials: int | None = None,
                 storage: str | None = None, study_name: str | None = None, results: str | Path | None = None,
                 progress: bool = True, backend: str = "sequential", address: str | None = None,
                 max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) a search; returns {best_params, best_value, best_config_path, trials, outputs, ...}.

    `n_trials` (default: the spec's) counts complete + pruned trials, those already in the storage
    included. `storage`: a SQLAlchemy URL (default SQLite under `<results>/.optuna/`). `study_name`:
    default the spec's name (also the results-store study its runs go to). ``backend="ray"``: the
    trials through Ray Tune (`studies.ray_session`: a local Ray, or the cluster at ``address``),
    `max_concurrent` at a time; ``"sequential"``: one after another in this process (run several
    processes on one storage to parallelize). Ends like every study (`studies.engine`): runs.csv and
    the tables from the results store.
    """
    study_file = load(spec_or_path)  # the study file, checked once (its `search` block below)
    spec = parse_search_spec(study_file.raw, where=f"study {study_file.source}")
    if backend not in ("sequential", "ray"):
        raise _config_error(f"backend must be sequential or ray, got {backend!r}")
    if address and backend != "ray":
        raise _config_error("--address names a Ray cluster: give it with --backend ray")
    if address:  # seconds, not Ray's minutes of retries after the first trial is planned
        check_reachable(address)
    max_concurrent = 1 if max_concurrent is None else max_concurrent
    if max_concurrent < 1:
        raise _config_error(f"max_concurrent must be >= 1, got {max_concurrent}")
    if max_concurrent > 1 and backend != "ray":
        raise _config_error("max_concurrent > 1 needs --backend ray; without Ray, start several searches on the same "
                            "--storage instead: they share the trials")
    if n_trials is not None and n_trials < 1:
        raise _config_error(f"n_trials must be >= 1, got {n_trials}")
    name = study_name or spec.name
    root = (Path(results) if results else results_root()).expanduser().resolve()
    ctx = _Context(spec=spec, study_name=name, results=root, storage_url=storage or default_storage(root, name),
                   n_trials=n_trials or spec.n_trials, progress=progress, me=_me(), resources=study_file.resources)
    with _quiet_optuna():
        t0 = time.perf_counter()
        rdb = open_storage(ctx.storage_url)
        study = _open_study(ctx, rdb)
        if progress:
            print(f"search {name}: {ctx.n_trials} trials of {', '.join(spec.params)} -> {spec.direction} "
                  f"{spec.metric}; {len(_finished(study))} already finished in {_redact(ctx.storage_url)}",
                  flush=True)
        if backend == "ray":
            with ray_session(address, root, progress=progress):
                _run_ray(ctx, study, rdb, max_concurrent)
        else:
            _run_local(ctx, study, rdb)
        out = _summary(ctx, study, time.perf_counter() - t0)
    trials = {t["run_dir"]: t for t in out["trials"] if t.get("run_dir")}
    if trials:  # the same end as every study: its outputs (here runs.csv: one row per trial) from the store
        frame = ResultsStore(root).frame(name)
        frame = frame[frame["run_dir"].isin(trials)].reset_index(drop=True)
        for key in spec.params:
            frame.insert(0, key, [trials[d]["params"].get(key) for d in frame["run_dir"]])
        frame.insert(0, "trial", [trials[d]["number"] for d in frame["run_dir"]])
        out["outputs"] = write_outputs(study_file, ResultsStore(root), frame=frame.sort_values("trial"),
                                       out_dir=root / name / "tables")["outputs"]
    return out


def _redact(url: str) -> str:
    return redact(url)


@contextmanager
def _quiet_optuna():
    """Optuna's per-trial INFO lines off (the search prints its own), and two warnings that do not apply:
    heartbeats are recorded by this module (ask and tell), and fail_stale_trials is "experimental"."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            warnings.filterwarnings("ignore", message=".*fail_stale_trials is experimental")
            warnings.filterwarnings("ignore", message="Argument ``(heartbeat_interval|grace_period|"
                                                      "heartbeat_stale_trial_callback)`` is an experimental")
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def _summary(ctx: _Context, study: Any, seconds: float) -> dict[str, Any]:
    spec = ctx.spec
    trials = [{"number": t.number, "state": t.state.name.lower(),
               "value": t.value if t.state.name == "COMPLETE" else None, "params": dict(t.params),
               "run_name": t.user_attrs.get("run_name"), "run_dir": t.user_attrs.get("run_dir")}
              for t in study.get_trials(deepcopy=False)]
    best = _best(study)
    out: dict[str, Any] = {"best_params": None, "best_value": None, "best_config_path": None, "trials": trials,
                           "study_name": ctx.study_name, "storage": _redact(ctx.storage_url)}
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    if best is None:
        if ctx.progress:
            print(f"search {ctx.study_name}: no complete trial ({counts}); no best.yaml written", flush=True)
        return out
    run_name = best.user_attrs.get("run_name") or f"{ctx.study_name}-trial{best.number}"
    cfg = trial_config(spec, best.params, run_name=run_name, study=ctx.study_name)
    path = ctx.results / ctx.study_name / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# tvkd run {path} --results {ctx.results}\n"
              f"#\n# Best of search {ctx.study_name!r} ({_redact(ctx.storage_url)}): trial {best.number}, "
              f"{spec.metric} = {best.value:.6g} ({spec.direction}); {_fmt(best.params)}.\n"
              f"# Trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed. As written "
              "this is that trial's own config,\n# so the command finds its run in the results store; change name "
              "or seed to train it anew.\n")
    atomic_write_text(path, header + dump_config(cfg))
    out.update(best_params=dict(best.params), best_value=best.value, best_config_path=path,
               best_run_dir=best.user_attrs.get("run_dir"))
    if ctx.progress:
        print(f"search {ctx.study_name}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} "
              f"failed in {seconds:.1f}s; best trial {best.number} {spec.metric}={best.value:.4g} "
              f"({_fmt(best.params)}); config: {path}", flush=True)
    return out


# ---- command line ----------------------------------------------------------------------------


def add_search_arguments(p: Any) -> None:
    """The arguments of ``python -m studies.search`` (``tvkd study search`` declares the same ones itself)."""
    p.add_argument("spec", help="a study file with a search block (base run config + search), e.g. "
                                "studies/examples/alpha_search.yaml")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///<results>/.optuna/"
                                                   "<study>.db); a killed search resumes from it")
    p.add_argument("--n-trials", type=int, default=None, help="complete+pruned trials wanted (default: the spec's)")
    p.add_argument("--study-name", default=None, help="Optuna study / results-store study (default: the spec's name)")
    p.add_argument("--results", default=None, help="results store root (default $TVKD_RESULTS or ./results)")
    p.add_argument("--backend", choices=["sequential", "ray"], default="sequential")
    p.add_argument("--address", default=None, help="with --backend ray: an existing Ray cluster, HOST:PORT")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (with --backend ray)")
    p.add_argument("--quiet", action="store_true")


def cli_search(args: Any) -> int:
    """Run ``tvkd study search`` from parsed arguments (`add_search_arguments`; all but `spec` optional)."""
    def opt(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    out = search_study(args.spec, n_trials=opt("n_trials"), storage=opt("storage"), study_name=opt("study_name"),
                       results=opt("results"), progress=not opt("quiet", False), backend=opt("backend", "sequential"),
                       address=opt("address"), max_concurrent=opt("max_concurrent"))
    if out["best_config_path"] is None:
        return 1
    print(f"best: {out['best_config_path']}")
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m studies.search", description="hyperparameter search "
                                     "(the same as `tvkd study search`)")
    add_search_arguments(parser)
    try:
        sys.exit(cli_search(parser.parse_args()))
    except KeyboardInterrupt:
        print("interrupted: finished trials are in the storage; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, KeyError, OSError) as e:
        if os.environ.get("TVKD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
