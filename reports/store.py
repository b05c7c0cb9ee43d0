"""A study's results frame from the results store alone, and its tables rebuilt from it.

`store_frame` reads the run folders of a study (``<results>/<study>[-<profile>][-quick]/``) and
nothing else: no model, no cache, no run's in-memory state. It expands the study's spec (names only:
`studies.spec.StudyFile.runs`) to know which runs belong to it and the descriptive columns of each,
then picks, for every (run label, seed), the complete run folder whose config is the spec's (the
same config hash without the inputs' content fingerprints), else the newest complete folder of that
label and seed (a run made before the spec changed; named in a notice). The frame has one row per
run, in run order, with the columns every table generator reads:

    the run's info         label, variant and axis columns, the variant's descriptive keys, seed
    run_dir, record        the run folder and its `tvkd.results.RunRecord`
    <metric>               every numeric metric of metrics.json (``margin_accuracy``, ``oracle_score``,
                           ``mt_bench/score``, ...)
    method, aux, control, offset_source   from the loss config the run recorded (``control``: the variant's
                           descriptive ``control`` key when the loss ran none, e.g. ``ceiling``)
    config/<section>.<key> the settings a caption states (``config/loss.alpha``, ``config/loss.beta``,
                           ``config/loss.value_temperature``, ``config/train.learning_rate``, ...), as the run
                           recorded them (`reports.settings.config_columns`); absent when it did not
    items.oracle_score     {prompt: oracle score} from outputs.jsonl (None without one)
    items.margin_accuracy  per-test-pair outcomes from pairs.jsonl (None without one)
    win_rate_vs_<ref>      against the spec's ``reference_variant``, same seed, from both runs' outputs

`studies.engine.run_study` ends every study with `write_study_outputs` on this same frame,
so a table is the same whether its study was just run or rebuilt later by ``tvkd report``.

Table generators (`reports.tables.TABLES`) take ``(frame, out_dir)`` and return ``{format: path}``;
every generator registered with ``study=<the study's name>`` (and the spec's ``table``) is run.
Their outputs must be byte-identical when the store is: figures are saved with `reports.figures.save_figure`
(no time stamps or software versions in PNG/PDF metadata, fixed dpi).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reports.compare import compare_study, format_comparison, write_comparison
from reports.grid import write_grid_tables
from reports.selection import select_runs, write_checkpoint_selection, write_selection
from reports.settings import config_columns
from reports.tables import TABLES, discover
from studies.spec import load_spec, reference_label
from tvkd.evaluation.metrics import win_rate
from tvkd.paths import results_root
from tvkd.results import ResultsStore, config_hash

__all__ = ["NoCompleteRuns", "StoreFrame", "frame_from_records", "generators_for", "report_study", "store_frame",
           "write_study_outputs"]

class NoCompleteRuns(LookupError):
    """A study has no complete run in the results store (nothing to build a table from)."""


def frame_from_records(spec: dict[str, Any], rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: its info + metrics + win rate against the reference variant (same seed).

    ``rows``: ``{**info, "label": ..., "run_dir": ..., "record": RunRecord}`` per run, in run order.
    The win rate compares the oracle scores of two runs' greedy outputs prompt by prompt (ties 1/2).
    """
    ref_label = spec.get("reference_variant")
    by_seed_label = {(r["seed"], r["label"]): r for r in rows}
    labels = {r["label"] for r in rows}
    records = []
    for r in rows:
        rec = r["record"]
        m = dict(rec.metrics)
        row = {k: v for k, v in r.items() if k != "record"}
        row.update({k: v for k, v in m.items() if isinstance(v, (int, float))})
        # a benchmark scored by a stand-in judge says so (a string): tables must show it
        row.update({k: v for k, v in m.items() if k.endswith("/stand_in_judge") and v})
        loss_cfg = m.get("loss_config", {}) or {}
        row.setdefault("method", "tvkd" if "aux" in loss_cfg else r["label"])
        row["aux"] = loss_cfg.get("aux")
        # a control the loss ran (shuffled offsets), else the variant's own word for it (``control: ceiling``:
        # plain DPO on oracle-relabelled pairs, whose loss config has no control)
        row["control"] = loss_cfg.get("control") or r.get("control") or "none"
        row["offset_source"] = loss_cfg.get("offset_source")
        # the settings the captions state (α, β, β_V, learning rate, ...), as this run recorded them
        row.update(config_columns(rec.config if isinstance(rec.config, dict) else None, loss_cfg))
        # per-item results behind oracle_score and margin_accuracy, for paired effect sizes (reports/effects.py)
        outputs = rec.outputs()
        row["items.oracle_score"] = ({o["prompt"]: o["oracle"] for o in outputs if o.get("oracle") is not None}
                                     or None)
        pairs = rec.outputs("pairs.jsonl")
        row["items.margin_accuracy"] = [p["margin_accuracy"] for p in pairs] or None
        if ref_label:
            ref_run = reference_label(ref_label, r["label"], r.get("variant"), labels)
            ref = by_seed_label.get((r["seed"], ref_run)) if ref_run else None
            if ref is not None:
                mine = {o["prompt"]: o.get("oracle") for o in outputs}
                theirs = {o["prompt"]: o.get("oracle") for o in ref["record"].outputs()}
                common = [p for p in mine if p in theirs and mine[p] is not None and theirs[p] is not None]
                if common:
                    row[f"win_rate_vs_{ref_label}"] = win_rate([mine[p] for p in common], [theirs[p] for p in common])
        records.append({**row, "record": rec})
    return pd.DataFrame.from_records(records)


@dataclass
class StoreFrame:
    """`store_frame`'s answer: the frame and what it could not find."""

    study: str  # the results folder (name[-profile][-quick])
    spec: Any  # studies.spec.StudyFile
    frame: pd.DataFrame
    root: Path
    expected: int = 0  # runs the spec has
    missing: list[tuple[str, int]] = field(default_factory=list)  # (label, seed) without a complete run
    stale: list[tuple[str, int]] = field(default_factory=list)  # shown from a run whose config is not the spec's now
    duplicates: list[tuple[str, int]] = field(default_factory=list)  # several complete runs matched; newest used

    def notices(self) -> list[str]:
        """One line per thing a reader of the tables should know (missing runs, older configs)."""
        def named(items: list[tuple[str, int]]) -> str:
            shown = ", ".join(f"{label} (seed {seed})" for label, seed in items[:6])
            return shown + (f" and {len(items) - 6} more" if len(items) > 6 else "")

        out = []
        if self.missing:
            out.append(f"{len(self.missing)} of {self.expected} runs of {self.study} have no complete run in "
                       f"{self.root / self.study}: {named(self.missing)}")
        if self.stale:
            out.append(f"{len(self.stale)} rows come from runs whose config differs from the spec's now (run before "
                       f"the spec or the code changed; `tvkd study run` would redo them): {named(self.stale)}")
        if self.duplicates:
            out.append(f"{len(self.duplicates)} (label, seed) have several complete runs of the spec's config (their "
                       f"inputs differ, e.g. a rebuilt testbed); the newest is used: {named(self.duplicates)}")
        return out


def _config_key(config: dict[str, Any] | None, ignore: frozenset[str]) -> str | None:
    """The hash of a run's config without its inputs' fingerprints (what the spec alone determines)."""
    if not isinstance(config, dict):
        return None
    return config_hash({k: v for k, v in config.items() if k not in ("inputs", "processes", "loss_defaults")},
                       ignore=ignore)


def _finished(record: Any) -> str:
    return str(record.status.get("finished_at") or record.status.get("updated_at") or "")


def store_frame(study: Any, results: str | Path | None = None, *, quick: bool = False, profile: str | None = None,
                seeds: list[int] | None = None) -> StoreFrame:
    """The results frame of a study (a name, a YAML path or a `StudyFile`) from the results store only.

    ``seeds``: the seeds to show; by default the spec's and any other seed the store holds complete runs
    of (``tvkd study run --seeds ...``). Raises `NoCompleteRuns` when the store has no complete run of the study.
    """
    spec = load_spec(study, profile)
    store = ResultsStore(Path(results) if results is not None else results_root())
    name = spec.study_name(quick)
    by_run: dict[tuple[str, int], list[Any]] = {}
    for record in store.records(name):
        cfg = record.config if isinstance(record.config, dict) else {}
        if record.complete and isinstance(cfg.get("seed"), int) and not isinstance(cfg.get("seed"), bool):
            by_run.setdefault((str(cfg.get("name")), cfg["seed"]), []).append(record)
    if seeds is None:
        own = [r.seed for r in spec.runs(quick=quick)]
        labels = set(spec.labels(quick))
        seeds = list(dict.fromkeys(own + sorted({s for label, s in by_run if label in labels} - set(own))))
    runs = spec.runs(seeds=seeds, quick=quick)
    result = StoreFrame(study=name, spec=spec, frame=pd.DataFrame(), root=store.root, expected=len(runs))
    rows = []
    for run in runs:
        found = by_run.get((run.label, run.seed), [])
        if not found:
            result.missing.append((run.label, run.seed))
            continue
        want = _config_key(run.config.to_dict(), store.ignore)
        exact = [r for r in found if _config_key(r.config, store.ignore) == want]
        pool = exact or found
        if not exact:
            result.stale.append((run.label, run.seed))
        elif len(exact) > 1:
            result.duplicates.append((run.label, run.seed))
        record = max(pool, key=lambda r: (_finished(r), str(r.run_dir)))
        rows.append({**run.info, "label": run.label, "run_dir": str(record.run_dir), "record": record})
    if not rows:
        where = store.root / name
        raise NoCompleteRuns(f"study {name}: no complete run in {where}" + (
            "" if where.is_dir() else " (no such folder)") + f"; run it first: tvkd study run {spec.base_name}"
            + (f" --profile {spec.profile}" if spec.profile else "") + (" --quick" if quick else ""))
    result.frame = frame_from_records(spec.raw, rows)
    return result


def generators_for(spec: Any) -> list[str]:
    """The table generators of a study: its spec's ``table``, then every one registered with its name."""
    tables = discover()
    names = [spec.table] if spec.table else []
    names += [n for n in tables.names() if tables.meta(n).get("study") == spec.base_name and n not in names]
    return names


def write_study_outputs(spec: Any, frame: pd.DataFrame, out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Run the study's table generators on ``frame`` into ``out_dir`` (a study with none gets the generic
    table of `reports.grid`) and write ``runs.csv`` (one row per run, without the record and per-item
    columns); returns ``{generator: {format: path}}``, with ``{"runs": {"csv": path}}`` last.

    A study with ``select`` (`reports.selection`): its picks first (``{"selection": {"md", "csv"}}``), then the
    tables of the picked runs only (over learning rates; over checkpoints every run is its own pick); runs.csv
    holds every run, the picked ones marked."""
    out = Path(out_dir)
    written: dict[str, dict[str, Path]] = {}
    every_run = frame
    select = getattr(spec, "select", None)
    if select is not None and select.axis is None and len(frame):  # checkpoints: every run picked its own
        written["selection"] = write_checkpoint_selection(spec, frame, out)
    elif select is not None and len(frame):
        selection = select_runs(spec, frame)
        written["selection"] = write_selection(selection, spec, out)
        frame, every_run = selection.picked, selection.frame
    generators = generators_for(spec)
    for name in generators:
        written[name] = {fmt: Path(path) for fmt, path in TABLES.get(name)(frame, out).items()}
    if not generators and (spec.variants or spec.axes) and len(frame):  # a grid of one's own: the generic table
        written["grid"] = write_grid_tables(spec, frame, out)
    items = [c for c in every_run.columns if c.startswith("items.")]
    out.mkdir(parents=True, exist_ok=True)  # a grid without a table still gets its runs.csv
    every_run.drop(columns=["record", *items], errors="ignore").to_csv(out / "runs.csv", index=False)
    written["runs"] = {"csv": out / "runs.csv"}
    return written


@dataclass
class StudyReport:
    """What `report_study` wrote for one study."""

    study: str
    out_dir: Path
    files: dict[str, dict[str, Path]]
    notices: list[str]
    comparisons: list[Any] = field(default_factory=list)  # reports.compare.Comparison
    comparison_text: str = ""


def report_study(study: Any, results: str | Path | None = None, out_dir: str | Path | None = None, *,
                 quick: bool = False, profile: str | None = None, compare_paper: bool = False) -> StudyReport:
    """Rebuild a study's tables (and figures) from the results store; with ``compare_paper``, also its
    comparison with the paper (`reports.compare`), written as ``paper_<table>.md/.png/.pdf``.

    Outputs go to ``out_dir`` (default ``<results>/<study folder>/tables``). Raises `NoCompleteRuns`.
    """
    sf = store_frame(study, results, quick=quick, profile=profile)
    out = Path(out_dir) if out_dir is not None else sf.root / sf.study / "tables"
    files = write_study_outputs(sf.spec, sf.frame, out)
    report = StudyReport(study=sf.study, out_dir=out, files=files, notices=sf.notices())
    if compare_paper:
        report.comparisons = compare_study(sf.frame, sf.spec, generators_for(sf.spec), study=sf.study,
                                           profile=sf.spec.profile)
        texts = []
        for c in report.comparisons:
            files[f"paper_{c.map.name}"] = write_comparison(c, out)
            texts.append(format_comparison(c))
        report.comparison_text = "\n".join(texts) if texts else (
            f"{sf.study}: none of its tables declares a paper table to compare with (reports/compare.py PaperMap)\n")
    return report
