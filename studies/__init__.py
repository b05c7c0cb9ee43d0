"""Studies: one declarative YAML per paper table or figure, and the engine that runs them.

A study file (``studies/<name>.yaml``; the format: `studies.spec`) holds a base run config,
variants and/or axes expanded as a product (with exclude / include rules), the seeds, the table
generator that turns its results into LaTeX/Markdown, profiles (e.g. the paper's own setting), what
a run reserves on Ray, and optionally an Optuna ``search`` block. It is checked whole before
anything runs. `studies.engine.run_study` runs it with an executor — `studies.engine.Sequential`, or
`studies.ray_executor.RayExecutor` — and writes its tables from the results store (`reports`);
`studies.search` searches a study's ``search`` block with Optuna; `studies.plan` says which runs are
done and how long the rest should take. Only ``studies/*.yaml`` are registered as paper studies: the
examples under ``studies/examples/`` run by path.

The package itself exports only the format: `reports` depends on it, and the engine depends on `reports`.
"""

from __future__ import annotations

from studies.spec import STUDIES, StudyFile, StudySpecError, load_spec, parse_spec

__all__ = ["STUDIES", "StudyFile", "StudySpecError", "load_spec", "parse_spec"]
