"""Sequential study driver: expand (variant x seed) into run configs, run what is missing, tabulate."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tvkd.config import RunConfig, config_from_dict
from tvkd.paths import results_root

# Keys of a variant that are run-config keys (the rest, e.g. `method`, describe the row).
RUN_KEYS = ("models", "data", "tokenize", "loss", "train", "cache", "eval", "eval_only", "num_threads", "testbed")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "loss":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_study(name: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A study spec from a registered name, a YAML path, or a dict (returned as is)."""
    from studies import STUDIES

    if isinstance(name, dict):
        return name
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return yaml.safe_load(path.read_text())
    return yaml.safe_load(STUDIES.get(str(name)).read_text())


def expand_study(spec: dict[str, Any], *, seeds: list[int] | None = None, quick: bool = False) -> list[tuple[dict, RunConfig]]:
    """[(variant info, run config)] for every variant and seed, in run order (seed-major)."""
    base = spec.get("base", {})
    seeds_given = seeds is not None
    seeds = list(seeds if seeds_given else spec.get("seeds", [0]))
    if quick and spec.get("quick"):
        base = deep_merge(base, spec["quick"].get("base", {}))
        if not seeds_given:
            seeds = list(spec["quick"].get("seeds", seeds))
    out = []
    for seed in seeds:
        for variant in spec["variants"]:
            over = {k: v for k, v in variant.items() if k in RUN_KEYS}
            cfg_dict = deep_merge(base, over)
            cfg_dict.update(name=variant["label"], seed=seed, study=spec["name"] + ("-quick" if quick else ""))
            info = {k: v for k, v in variant.items() if k not in over}
            info["seed"] = seed
            out.append((info, config_from_dict(cfg_dict, where=f"study {spec['name']} variant {variant['label']}")))
    return out


def run_study(name: str | Path | dict[str, Any], *, seeds: list[int] | None = None, results: str | Path | None = None,
              out_dir: str | Path | None = None, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a study and write its tables. Returns {"frame": DataFrame, "tables": {fmt: path}}."""
    from reports.tables import discover
    from tvkd.pipeline import execute, identity
    from tvkd.results import ResultsStore

    spec = load_study(name)
    name = spec["name"]
    store = ResultsStore(Path(results) if results else results_root())
    runs = expand_study(spec, seeds=seeds, quick=quick)
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
    out = Path(out_dir) if out_dir else store.root / (spec["name"] + ("-quick" if quick else "")) / "tables"
    tables = discover().get(spec["table"])(frame, out) if spec.get("table") else {}
    items = [c for c in frame.columns if c.startswith("items.")]
    frame.drop(columns=["record", *items], errors="ignore").to_csv(out / "runs.csv", index=False) if tables else None
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
