"""`tvkd bench`: the project's speed and memory targets, as ratios measured in one run.

- `tvkd.bench.targets`: the testbed-shape targets (`tvkd bench`): the TVKD step against the DPO step,
  this trainer against TRL's DPOTrainer, the teacher cache's bytes and build speed, optionally DDP;
- `tvkd.bench.paper`: the paper's model shapes (`tvkd bench --shapes paper`): the teacher cache
  (the one-pass and the full-logits path against the bare forward), the TVKD training step with
  chunked log-probs, padding-free batches and the length-bucketed sampler against the plain step.

Both write their JSON under the results root (``$TVKD_RESULTS``, default ./results).
"""

from __future__ import annotations

from pathlib import Path


def bench_output(name: str, out: str | Path | None = None) -> Path:
    """Where a bench writes its JSON: `out` if given, else ``<results root>/<name>``."""
    from tvkd.paths import results_root

    path = Path(out) if out else results_root() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
