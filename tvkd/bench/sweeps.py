"""The sweep bench: the speed-up of concurrent Ray trials on a 4-run testbed grid, beside the machine's own
headroom for that many busy processes (`tvkd bench --sweeps`)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from studies.engine import run_study
from studies.ray_executor import RayExecutor
from studies.spec import deep_merge, load_spec, read_study
from tvkd.paths import cache_root

__all__ = ["bench_ray_speedup", "bench_spec", "parallel_headroom"]

#: A testbed small enough to build in well under a minute (used when the default one is not built).
TINY_TESTBED = {"num_sft": 400, "num_pref_train": 256, "num_pref_test": 64, "num_test": 64, "teacher_layers": 2,
                "teacher_hidden": 64, "teacher_intermediate": 128, "student_hidden": 32, "student_intermediate": 64,
                "teacher_sft_epochs": 2, "student_sft_epochs": 2, "samples_per_prompt": 2}


def _testbed_built(overrides: dict[str, Any] | None = None) -> bool:
    from tvkd.testbed.build import STAGE_FILE, TestbedConfig, stage_keys  # lazy: transformers

    root = cache_root() / "testbed"
    return all((root / f"{stage}-{key}" / STAGE_FILE).is_file()
               for stage, key in stage_keys(TestbedConfig(**(overrides or {}))).items())


def bench_spec(testbed: str = "auto", quick: bool = True) -> tuple[dict[str, Any], str]:
    """The bench grid: reward-conflict's variants dpo and soft_value x seeds 0 and 1 (4 runs) with its
    ``--quick`` settings (``quick=False``: its full ones), on the default testbed when it is built
    (``testbed="auto"``) or forced (``"default"``), else on the small `TINY_TESTBED` (``"tiny"``).
    Returns (spec, which testbed)."""
    if testbed not in ("auto", "default", "tiny"):
        raise ValueError(f"testbed must be auto, default or tiny, got {testbed!r}")
    which = testbed if testbed != "auto" else ("default" if _testbed_built() else "tiny")
    spec = copy.deepcopy(read_study("reward-conflict")[0])
    base = deep_merge(spec["base"], spec["quick"]["base"]) if quick else spec["base"]
    if which == "tiny":
        base = deep_merge(base, {"testbed": TINY_TESTBED, "data": {"test_limit": 32}})
    spec = {"name": "bench-ray", "table": None, "seeds": [0, 1], "base": base,
            "variants": [v for v in spec["variants"] if v["label"] in ("dpo", "soft_value")]}
    return spec, which


_SPIN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(15_000_000):\n    x += i\nprint(time.perf_counter() - t)"


def parallel_headroom(n: int = 2) -> float:
    """How much more CPU work this machine does right now with `n` busy processes than with one (at most `n`):
    the ceiling of any trial speed-up measured beside it (other people's jobs on a shared box lower it)."""
    def wall(k: int) -> float:
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.DEVNULL) for _ in range(k)]
        for p in procs:
            p.wait()
        return time.perf_counter() - t

    return round(n * wall(1) / wall(n), 2)


def bench_ray_speedup(*, concurrency: tuple[int, ...] = (1, 2), testbed: str = "auto", quick: bool = True,
                      workdir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Wall time of the 4-run bench grid (`bench_spec`) through `RayExecutor` at each trial concurrency,
    each into a fresh results store and a fresh cache (the testbed shared), and the speed-up of the
    largest concurrency over 1. The testbed is built (or found) before the clocks start."""
    from tvkd.pipeline import identity  # lazy: torch, transformers

    spec, which = bench_spec(testbed, quick)
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tvkd-bench-ray-"))
    base.mkdir(parents=True, exist_ok=True)
    for run in load_spec(spec).runs()[:1]:
        identity(run.config, progress=progress)  # build (or find) the testbed outside the timings
    shared_testbed = (cache_root() / "testbed").resolve()
    old_cache = os.environ.get("TVKD_CACHE")
    wall: dict[int, float] = {}
    try:
        for n in concurrency:
            cache = base / f"cache-{n}"
            cache.mkdir(parents=True, exist_ok=True)
            if not (cache / "testbed").exists():
                (cache / "testbed").symlink_to(shared_testbed, target_is_directory=True)
            os.environ["TVKD_CACHE"] = str(cache)  # teacher / reference caches are built in each measurement
            t = time.perf_counter()
            out = run_study(spec, RayExecutor(max_concurrent=n), results=base / f"results-{n}", progress=progress)
            wall[n] = round(time.perf_counter() - t, 2)
            if out["failed"]:
                raise RuntimeError(f"bench grid at {n} concurrent trials: {len(out['failed'])} run(s) failed: "
                                   + "; ".join(str(f.get("store_error") or f.get("error")) for f in out["failed"]))
    finally:
        if old_cache is None:
            os.environ.pop("TVKD_CACHE", None)
        else:
            os.environ["TVKD_CACHE"] = old_cache
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    top = max(concurrency)
    headroom = parallel_headroom(top)
    result = {"grid": f"reward-conflict{' --quick' if quick else ''}: dpo + soft_value x seeds 0, 1 (4 runs)",
              "testbed": which,
              "cpus": cpus, "wall_s": wall, "speedup": round(wall[1] / wall[top], 2) if 1 in wall else None,
              "concurrency": top, "parallel_headroom": headroom}
    print(f"bench ray: 4-run grid on the {which} testbed, {cpus} CPUs: "
          + ", ".join(f"{n} at once {w:.1f}s" for n, w in wall.items())
          + (f"; speed-up at {top}: {result['speedup']:.2f}x" if result["speedup"] else "")
          + f" (this machine's own headroom for {top} busy processes right now: {headroom:.2f}x)", flush=True)
    return result
