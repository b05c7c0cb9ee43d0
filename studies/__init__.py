"""Studies: one declarative YAML per paper table or figure, and the drivers that run them.

A study file (``studies/<name>.yaml``) holds a base run config, a list of variants (each a
label plus the keys it changes) and/or axes expanded as a product (with exclude / include rules),
the seeds, and the table generator that turns its results into LaTeX/Markdown (the format:
`studies.spec`). Every spec is validated before anything runs. `run_study` runs every run
sequentially through the results store, so an interrupted study resumes where it stopped and a
finished one only rewrites its tables; `plan_study` says which runs are done and how long the
rest should take. Only ``studies/*.yaml`` are registered as paper studies: the examples under
``studies/examples/`` run by path.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tvkd.registry import Registry

STUDIES: Registry[Path] = Registry("study")
STUDY_DIR = Path(__file__).parent


def _discover() -> None:
    for path in sorted(STUDY_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        STUDIES.add(spec.get("name", path.stem), path, description=spec.get("description", ""),
                    table=spec.get("table"))


_discover()

from studies.runner import expand_study, load_study, run_study  # noqa: E402
from studies.spec import StudySpec, StudySpecError, format_plan, load_spec, parse_spec, plan_study  # noqa: E402

__all__ = ["STUDIES", "StudySpec", "StudySpecError", "expand_study", "format_plan", "load_spec", "load_study",
           "parse_spec", "plan_study", "run_study"]
