"""The study engine: one `run_study` for every backend.

    run_study("reward-conflict")                                        # one run after another, here
    run_study("reward-conflict", RayExecutor(max_concurrent=2))         # Ray Tune, locally or on a cluster

A study file (`studies.spec`) is loaded and checked once, expanded into its runs, and handed to an
executor, which only decides which runs to do and where: `Sequential` runs them one after another in
this process, `studies.ray_executor.RayExecutor` as Ray Tune trials (`studies.search` is the
Optuna executor of a study's ``search`` block). Every run, whoever runs it, is the one
`tvkd.pipeline.execute`, keyed by its content in the results store, so a finished run is never
trained again. Every study ends with the same call, `write_outputs`: the tables are built from the
results store alone (`reports.store`), so they are byte for byte the same whichever backend ran the
runs, and the same as ``tvkd report`` writes later. A study's ``select`` (per-variant picks on validation,
`reports.selection`) is applied there too, so every backend's picks come from the one code path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from reports.store import NoCompleteRuns, store_frame, write_study_outputs
from reports.tables import discover
from studies.spec import StudyFile, StudyRun, StudySpecError, load_spec
from tvkd.paths import results_root
from tvkd.results import ResultsStore

__all__ = ["Executor", "Sequential", "load", "run_study", "write_outputs"]


class Executor(Protocol):
    """Decides which runs of a study to do, and where; returns the runs that failed (one dict each:
    ``label``, ``seed``, ``error`` and, when there is one, ``run_dir``)."""

    name: str

    def run(self, spec: StudyFile, runs: list[StudyRun], store: ResultsStore, *, progress: bool
            ) -> list[dict[str, Any]]: ...

    def summary(self) -> dict[str, Any]:
        """What `run_study` returns beside the tables (the Ray executor: its trials and experiment)."""
        ...


class Sequential:
    """Every run in turn, in this process; a failing run stops the study (rerun to resume)."""

    name = "sequential"

    def run(self, spec: StudyFile, runs: list[StudyRun], store: ResultsStore, *, progress: bool
            ) -> list[dict[str, Any]]:
        from tvkd.pipeline import execute  # lazy: torch, transformers

        for i, r in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {r.label} seed {r.seed}", flush=True)
            execute(r.config, store=store, progress=progress)
        return []

    def summary(self) -> dict[str, Any]:
        return {}


def load(study: str | Path | dict[str, Any] | StudyFile, profile: str | None = None) -> StudyFile:
    """The checked study file (`studies.spec.load_spec`) whose ``table``, if it names one, is a registered
    table generator: every problem is found here, before any run or Ray session starts."""
    spec = load_spec(study, profile)  # an unknown name: the registry's error, with the valid names
    tables = discover()
    if spec.table and spec.table not in tables:
        raise StudySpecError(spec.source, [f"table: {tables.unknown_message(spec.table)}"])
    return spec


def write_outputs(spec: StudyFile, store: ResultsStore, *, quick: bool = False, seeds: list[int] | None = None,
                  out_dir: str | Path | None = None, partial: bool = False, frame: Any = None) -> dict[str, Any]:
    """The end of every study: its frame from the results store (`reports.store.store_frame`; a search
    gives the frame of its trials, read from the store too) and every table generator of the study, plus
    runs.csv (`reports.store.write_study_outputs`). ``partial`` (some runs failed): a generator that
    cannot cope with the missing rows is reported, not raised, so that the failures are still named."""
    out = Path(out_dir) if out_dir else store.root / spec.study_name(quick) / "tables"
    check_out_dir(out_dir)
    try:
        if frame is None:
            frame = store_frame(spec, store.root, quick=quick, seeds=seeds).frame
        outputs = write_study_outputs(spec, frame, out)
    except Exception as e:  # noqa: BLE001 - only with failed runs; re-raised otherwise
        if not partial:
            raise
        kind = "no complete run" if isinstance(e, NoCompleteRuns) else f"{type(e).__name__}: {e}"
        print(f"tables not written ({kind})", flush=True)
        frame, outputs = None, {}
    return {"frame": frame, "outputs": outputs, "tables": outputs.get(spec.table, {}) if spec.table else {},
            "out_dir": out}


def check_out_dir(out_dir: str | Path | None) -> None:
    """``--out`` is a folder that exists or can be made: checked (and made) before any run, not after them all."""
    if out_dir is None:
        return
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there; give a folder for the tables (made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make that folder ({e.strerror or e}); give one you can write to") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: not writable; give a folder you can write to")


def run_study(study: str | Path | dict[str, Any] | StudyFile, executor: Executor | None = None, *,
              seeds: list[int] | None = None, results: str | Path | None = None, out_dir: str | Path | None = None,
              quick: bool = False, progress: bool = True, profile: str | None = None) -> dict[str, Any]:
    """Run (or resume) a study with ``executor`` (default `Sequential`) and write its tables from the store.

    Returns {"frame": DataFrame, "tables": {fmt: path} (the spec's ``table``), "outputs": {generator:
    {fmt: path}} (every generator of the study, and runs.csv), "out_dir": path, "failed": [...]}, plus
    what the executor adds (the Ray executor: ``trials``, ``experiment``).
    """
    from tvkd.pipeline import identity  # lazy: torch, transformers

    executor = executor or Sequential()
    spec = load(study, profile)  # checked: a bad spec stops here, before any run
    check_out_dir(out_dir)
    store = ResultsStore((Path(results) if results else results_root()).expanduser().resolve())
    runs = spec.runs(seeds=seeds, quick=quick)
    t0 = time.perf_counter()
    done = sum(store.is_complete(identity(r.config, progress=progress), study=r.config.study, name=r.label)
               for r in runs)
    where = "" if executor.name == "sequential" else f" on {executor.name}"
    print(f"study {spec.name}{' (quick)' if quick else ''}{where}: {len(runs)} runs, {done} already complete",
          flush=True)
    failed = executor.run(spec, runs, store, progress=progress)
    out = write_outputs(spec, store, quick=quick, seeds=seeds, out_dir=out_dir, partial=bool(failed))
    print(f"study {spec.name}: {len(runs)} runs, {len(failed)} failed, in {time.perf_counter() - t0:.1f}s; "
          f"tables in {out['out_dir']}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed (their error and traceback are in the run folder's status.json; the "
              "next call retries them):", flush=True)
        for f in failed:
            print(f"  {f['label']} seed {f['seed']}: {f['error']}" + (f"  [{f['run_dir']}]" if f.get("run_dir")
                                                                      else ""), flush=True)
    return {**out, "failed": failed, **executor.summary()}
