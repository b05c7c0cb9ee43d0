"""Sequential study driver: expand (variant x axes x seed) into run configs, run what is missing, tabulate.

The tables are built from the results store at the end (`reports.store.store_frame`), the same way
``tvkd report`` rebuilds them later.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from studies.spec import RUN_KEYS, StudySpec, deep_merge, load_spec, parse_spec
from tvkd.config import RunConfig
from tvkd.paths import results_root

__all__ = ["RUN_KEYS", "deep_merge", "expand_study", "load_study", "run_study", "study_frame"]


def load_study(name: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A study spec (the parsed YAML, not yet validated) from a registered name, a YAML path, or a dict (as is)."""
    from studies import STUDIES

    if isinstance(name, dict):
        return name
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return yaml.safe_load(path.read_text())
    return yaml.safe_load(STUDIES.get(str(name)).read_text())


def expand_study(spec: dict[str, Any] | StudySpec, *, seeds: list[int] | None = None, quick: bool = False,
                 profile: str | None = None) -> list[tuple[dict, RunConfig]]:
    """[(run info, run config)] for every run and seed, in run order (seed-major).

    The spec is validated first (`studies.spec.parse_spec`): a problem anywhere in it is a
    `StudySpecError` naming the field, before any run is built. ``profile``: with that profile merged
    in (a `StudySpec` carries its own).
    """
    spec = spec if isinstance(spec, StudySpec) else parse_spec(spec, profile=profile)
    return [(r.info, r.config) for r in spec.runs(seeds=seeds, quick=quick)]


def run_study(name: str | Path | dict[str, Any] | StudySpec, *, seeds: list[int] | None = None,
              results: str | Path | None = None, out_dir: str | Path | None = None, quick: bool = False,
              progress: bool = True, profile: str | None = None) -> dict[str, Any]:
    """Run (or resume) a study and write its tables from the results store.

    Returns {"frame": DataFrame, "tables": {fmt: path} (the spec's ``table``), "outputs": {generator: {fmt:
    path}} (every generator of the study, and runs.csv), "out_dir": path}.
    ``profile``: the study's profile (e.g. ``paper``), merged over its spec.
    """
    from reports.store import store_frame, write_study_outputs
    from tvkd.pipeline import execute, identity
    from tvkd.results import ResultsStore

    parsed = load_spec(name, profile)  # validated: a bad spec stops here, before any run
    name = parsed.name
    store = ResultsStore(Path(results) if results else results_root())
    runs = expand_study(parsed, seeds=seeds, quick=quick)
    t0 = time.perf_counter()
    done_before = sum(store.is_complete(identity(cfg, progress=progress), study=cfg.study, name=cfg.name)
                      for _, cfg in runs)
    print(f"study {name}{' (quick)' if quick else ''}: {len(runs)} runs, {done_before} already complete", flush=True)
    for i, (_, cfg) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {cfg.name} seed {cfg.seed}", flush=True)
        execute(cfg, store=store, progress=progress)
    frame = store_frame(parsed, store.root, quick=quick, seeds=seeds).frame
    out = Path(out_dir) if out_dir else store.root / parsed.study_name(quick) / "tables"
    outputs = write_study_outputs(parsed, frame, out)
    print(f"study {name}: {len(runs)} runs in {time.perf_counter() - t0:.1f}s; tables in {out}", flush=True)
    return {"frame": frame, "tables": outputs.get(parsed.table, {}) if parsed.table else {}, "outputs": outputs,
            "out_dir": out}


def study_frame(spec: dict[str, Any], rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run from run records in hand: variant info + metrics + win rate against the reference
    variant (same seed); `reports.store.frame_from_records`, which `reports.store.store_frame` uses too."""
    from reports.store import frame_from_records

    return frame_from_records(spec, rows)
