"""Planning a study: which of its runs the results store holds, what is left, and how long it should take.

`plan_study` expands a study file (`studies.spec`) and looks each run up in the results store;
`format_plan` is what ``tvkd study plan`` prints. With a profile (e.g. ``paper``) the plan also holds
an offline estimate of each run's GPU-hours (`reports.paper_compute`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reports.paper_compute import estimate_runs, format_estimate
from studies.spec import StudyFile, StudyRun, format_value, load_spec
from tvkd.paths import results_root as default_results_root
from tvkd.results import ResultsStore

__all__ = ["PlannedRun", "StudyPlan", "format_plan", "plan_study"]


@dataclass
class PlannedRun:
    """One run of a plan: the expanded run and where it stands in the results store (and, if it is still to
    run, how long it should take)."""

    run: StudyRun
    state: str  # complete | missing | running | failed | interrupted | error (its key could not be computed)
    run_dir: Path | None = None
    duration_s: float | None = None  # measured (complete runs)
    estimate_s: float | None = None  # expected (runs to do); None: unknown
    basis: str | None = None  # "label" | "study" | None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def __getattr__(self, name: str) -> Any:  # label, seed, variant, axes, info, config: the run's own
        if name == "run":
            raise AttributeError(name)
        return getattr(self.run, name)


@dataclass
class StudyPlan:
    """What `tvkd study plan` shows: every run, which are complete, and the time the rest should take."""

    study: str
    source: str
    quick: bool
    results_root: Path
    axes: list[str]
    has_variants: bool
    runs: list[PlannedRun]
    seeds: list[int]
    label_counts: dict[str, int] = field(default_factory=dict)  # label -> complete runs measured (any seed)
    study_count: int = 0  # complete runs of the study measured
    profile: str | None = None
    compute: list[Any] | None = None  # with a profile: `reports.paper_compute.RunEstimate` per run (GPU-hours)

    @property
    def complete(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.complete]

    @property
    def to_run(self) -> list[PlannedRun]:
        return [r for r in self.runs if not r.complete]

    @property
    def remaining_s(self) -> float:
        """The sum of the known estimates (runs without one are counted by `unknown`)."""
        return sum(r.estimate_s for r in self.to_run if r.estimate_s is not None)

    @property
    def unknown(self) -> int:
        return sum(1 for r in self.to_run if r.estimate_s is None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study, "source": self.source, "quick": self.quick, "results_root": str(self.results_root),
            "axes": self.axes, "seeds": self.seeds,
            "complete": len(self.complete), "to_run": len(self.to_run), "remaining_s": self.remaining_s,
            "unknown": self.unknown, "profile": self.profile,
            "gpu_hours": None if self.compute is None else [
                {"label": e.label, "seed": e.seed, "gpu_hours": e.gpu_hours, "flops": e.flops, "unknown": e.unknown}
                for e in self.compute],
            "runs": [{"label": r.label, "seed": r.seed, "variant": r.variant, "axes": r.axes, "state": r.state,
                      "run_dir": str(r.run_dir) if r.run_dir else None, "duration_s": r.duration_s,
                      "estimate_s": r.estimate_s, "basis": r.basis, "error": r.error} for r in self.runs],
        }


def _durations(store: Any, study: str) -> dict[str, list[float]]:
    """Measured ``duration_s`` of the study's complete runs, by run label ("" holds all of them)."""
    out: dict[str, list[float]] = {"": []}
    for rec in store.records(study):
        d = rec.status.get("duration_s")
        if not rec.complete or isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            continue
        out.setdefault(rec.name, []).append(float(d))
        out[""].append(float(d))
    return out


def plan_study(spec: str | Path | dict[str, Any] | StudyFile, results_root: str | Path | None = None,
               quick: bool = False, *, seeds: list[int] | None = None, progress: bool = False,
               profile: str | None = None) -> StudyPlan:
    """The runs of a study, which are already complete in the results store, and the time the rest should take.

    A run is complete when the store holds a finished run of its key (`tvkd.pipeline.identity`:
    the config plus the content of its inputs; a ``testbed:`` input is built first if it is not in
    the cache, as `run_study` would). A run still to do is estimated by the mean measured
    ``duration_s`` of the complete runs of the same study and label (any seed), else of the same
    study (any label), else it is unknown; runs are counted one after another, as `run_study` runs them.

    With a ``profile`` (e.g. ``paper``: hub models and data sets), the plan also holds an estimate of
    each run's GPU-hours from model sizes and token counts (`reports.paper_compute`), computed offline:
    no model or data set is loaded.
    """
    from tvkd.pipeline import identity  # lazy: torch, transformers

    spec = load_spec(spec, profile)
    store = ResultsStore(Path(results_root) if results_root is not None else default_results_root())
    runs = spec.runs(seeds=seeds, quick=quick)
    study = spec.study_name(quick)
    durations = _durations(store, study)
    mean = {k: sum(v) / len(v) for k, v in durations.items() if v}
    planned = []
    for r in runs:
        cfg = r.config
        p = PlannedRun(run=r, state="missing")
        try:
            key = identity(cfg, progress=progress)
            p.run_dir = store.run_dir(key, study=cfg.study, name=cfg.name)
            record = store.load(key, study=cfg.study, name=cfg.name, complete_only=False)
        except (ValueError, OSError, RuntimeError) as e:  # an unknown testbed part, an unreadable input, a collision
            p.state, p.error = "error", " ".join(str(e).split())
            record = None
        if record is not None:
            p.state = "complete" if record.complete else record.state
            d = record.status.get("duration_s")
            if record.complete and isinstance(d, (int, float)) and not isinstance(d, bool):
                p.duration_s = float(d)
        if not p.complete:
            dir_label = p.run_dir.name.rsplit("-", 1)[0] if p.run_dir is not None else None
            if dir_label in mean:
                p.estimate_s, p.basis = mean[dir_label], "label"
            elif "" in mean:
                p.estimate_s, p.basis = mean[""], "study"
        planned.append(p)
    return StudyPlan(
        study=study, source=spec.source, quick=quick, results_root=store.root, axes=[a.name for a in spec.axes],
        has_variants=bool(spec.variants), runs=planned, seeds=sorted({r.seed for r in runs}, key=runs and
                                                                     [r.seed for r in runs].index),
        label_counts={k: len(v) for k, v in durations.items() if k},
        study_count=len(durations[""]), profile=spec.profile, compute=_compute(runs) if spec.profile else None,
    )


def _compute(runs: list[StudyRun]) -> list[Any]:
    return estimate_runs([(r.label, r.seed, r.config) for r in runs])


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m"


def format_plan(plan: StudyPlan) -> str:
    """The plan as text: one line per run (seed, variant, axis values, state, time), then the totals."""
    n = len(plan.runs)
    configs = n // max(1, len(plan.seeds))
    source = f" ({plan.source})" if plan.source not in (plan.study, plan.study.removesuffix("-quick")) else ""
    flags = (f" --profile {plan.profile}" if plan.profile else "") + (" --quick" if plan.quick else "")
    lines = [f"study {plan.study}{source}{flags}; results store {plan.results_root}",
             f"{n} runs: {configs} configuration(s) x {len(plan.seeds)} seed(s) ({', '.join(map(str, plan.seeds))}), "
             "in this order"]
    header = ["seed"]
    if plan.has_variants:
        header.append("variant" if plan.axes else "label")
    header += plan.axes
    header += ["state", "time"]
    rows = []
    for r in plan.runs:
        row = [str(r.seed)]
        if plan.has_variants:
            row.append(r.variant or "")
        row += ["-" if r.axes.get(a) is None else format_value(r.axes[a]) for a in plan.axes]
        if r.complete:
            state, time = "complete", _duration(r.duration_s) if r.duration_s is not None else "?"
        else:
            state = {"missing": "to run", "running": "to run (left running, or running now)",
                     "failed": "to run (failed before)", "interrupted": "to run (interrupted before)",
                     "error": "error"}.get(r.state, f"to run ({r.state})")
            time = (f"~{_duration(r.estimate_s)} ({r.basis} mean)" if r.estimate_s is not None else "unknown")
            if r.error:
                time = r.error
        row += [state, time]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    done, todo = len(plan.complete), len(plan.to_run)
    lines.append(f"{done} complete, {todo} to run")
    if todo:
        by_label = sum(1 for r in plan.to_run if r.basis == "label")
        by_study = sum(1 for r in plan.to_run if r.basis == "study")
        if plan.unknown == todo:
            lines.append(f"remaining time: unknown (no complete run of study {plan.study} in the store has a measured "
                         "duration_s yet; plan again after the first run finishes)")
        else:
            known = todo - plan.unknown
            how = []
            if by_label:
                how.append(f"{by_label} from the mean of their own label's complete runs (any seed)")
            if by_study:
                how.append(f"{by_study} from the mean of all {plan.study_count} complete run(s) of the study")
            text = f"remaining time: ~{_duration(plan.remaining_s)} for {known} run(s), one after another"
            if plan.unknown:
                text += f", plus {plan.unknown} run(s) of unknown time"
            lines.append(text)
            lines.append(f"  estimated from the measured duration_s of complete runs in the store: {'; '.join(how)}")
    if plan.compute is not None:
        lines.append("")
        lines.append(format_estimate(plan.compute, [r.config.data.source for r in plan.runs]))
    return "\n".join(lines)
