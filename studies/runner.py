"""Sequential study driver: expand (variant x axes x seed) into run configs, run what is missing, tabulate."""

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


def expand_study(spec: dict[str, Any] | StudySpec, *, seeds: list[int] | None = None, quick: bool = False
                 ) -> list[tuple[dict, RunConfig]]:
    """[(run info, run config)] for every run and seed, in run order (seed-major).

    The spec is validated first (`studies.spec.parse_spec`): a problem anywhere in it is a
    `StudySpecError` naming the field, before any run is built.
    """
    spec = spec if isinstance(spec, StudySpec) else parse_spec(spec)
    return [(r.info, r.config) for r in spec.runs(seeds=seeds, quick=quick)]


def run_study(name: str | Path | dict[str, Any], *, seeds: list[int] | None = None, results: str | Path | None = None,
              out_dir: str | Path | None = None, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a study and write its tables. Returns {"frame": DataFrame, "tables": {fmt: path}}."""
    from reports.tables import discover
    from tvkd.pipeline import execute, identity
    from tvkd.results import ResultsStore

    parsed = load_spec(name)  # validated: a bad spec stops here, before any run
    spec = parsed.raw
    name = parsed.name
    store = ResultsStore(Path(results) if results else results_root())
    runs = expand_study(parsed, seeds=seeds, quick=quick)
    t0 = time.perf_counter()
    done_before = sum(store.is_complete(identity(cfg, progress=progress), study=cfg.study, name=cfg.name)
                      for _, cfg in runs)
    print(f"study {name}{' (quick)' if quick else ''}: {len(runs)} runs, {done_before} already complete", flush=True)
    rows = []
    for i, (info, cfg) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {cfg.name} seed {cfg.seed}", flush=True)
        rec = execute(cfg, store=store, progress=progress)
        rows.append({**info, "label": cfg.name, "run_dir": str(rec.run_dir), "record": rec})
    frame = study_frame(spec, rows)
    out = Path(out_dir) if out_dir else store.root / parsed.study_name(quick) / "tables"
    tables = discover().get(spec["table"])(frame, out) if spec.get("table") else {}
    items = [c for c in frame.columns if c.startswith("items.")]
    out.mkdir(parents=True, exist_ok=True)  # a grid without a table still gets its runs.csv
    frame.drop(columns=["record", *items], errors="ignore").to_csv(out / "runs.csv", index=False)
    print(f"study {name}: {len(runs)} runs in {time.perf_counter() - t0:.1f}s; tables in {out}", flush=True)
    return {"frame": frame, "tables": tables, "out_dir": out}


def study_frame(spec: dict[str, Any], rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: variant info + metrics + win rate against the reference variant (same seed).

    The win rate compares the oracle scores of two runs' greedy outputs prompt by prompt (ties 1/2).
    """
    from tvkd.evaluation.metrics import win_rate

    ref_label = spec.get("reference_variant")
    by_seed_label = {(r["seed"], r["label"]): r for r in rows}
    records = []
    for r in rows:
        rec = r["record"]
        m = dict(rec.metrics)
        row = {k: v for k, v in r.items() if k != "record"}
        row.update({k: v for k, v in m.items() if isinstance(v, (int, float))})
        loss_cfg = m.get("loss_config", {}) or {}
        row.setdefault("method", "tvkd" if "aux" in loss_cfg else r["label"])
        row["aux"] = loss_cfg.get("aux")
        row["control"] = loss_cfg.get("control", "none") or "none"
        row["offset_source"] = loss_cfg.get("offset_source")
        # per-item results behind oracle_score and margin_accuracy, for paired effect sizes (reports/effects.py)
        outputs = rec.outputs()
        row["items.oracle_score"] = ({o["prompt"]: o["oracle"] for o in outputs if o.get("oracle") is not None}
                                     or None)
        pairs = rec.outputs("pairs.jsonl")
        row["items.margin_accuracy"] = [p["margin_accuracy"] for p in pairs] or None
        if ref_label:
            ref = by_seed_label.get((r["seed"], ref_label))
            if ref is not None:
                mine = {o["prompt"]: o.get("oracle") for o in rec.outputs()}
                theirs = {o["prompt"]: o.get("oracle") for o in ref["record"].outputs()}
                common = [p for p in mine if p in theirs and mine[p] is not None and theirs[p] is not None]
                if common:
                    row[f"win_rate_vs_{ref_label}"] = win_rate([mine[p] for p in common], [theirs[p] for p in common])
        records.append({**row, "record": rec})
    return pd.DataFrame.from_records(records)
