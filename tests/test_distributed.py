"""Multi-process runs (DDP on CPU, gloo): `accelerate launch --multi_gpu --num_processes 2 -m tvkd run`.

One run split over two processes at 2 pairs each trains exactly like one process at 4 pairs (same
seed, same data order), writes one run folder from the main process only, and builds each cache
once. (`accelerate launch --cpu --num_processes 2` on one machine starts a single process: accelerate
sends multi-CPU jobs through mpirun; `--multi_gpu` on a machine without GPUs, or with
``ACCELERATE_USE_CPU=1``, starts N CPU processes under torchrun.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cfg(path: Path, world: dict, batch: int, **over) -> Path:
    cfg = {
        "name": "ddp", "seed": 0,
        "models": {"student": world["student"], "teacher": world["teacher"]},
        "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 8},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "tvkd", "aux": "soft_value"},  # reads the reference and the teacher caches
        # 24 pairs: 6 global batches of 4; warm-up off so that the first step moves the weights
        "train": {"learning_rate": 1e-3, "per_device_train_batch_size": batch, "logging_steps": 1,
                  "warmup_steps": 0, "extra": {"max_steps": 3}},
        "eval": {"max_new_tokens": 4, "generate": False, "teacher_scores": False},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
         "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    e.update(extra)
    return e


def launch(program: list[str], n: int = 2, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `program` over `n` CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *program]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(**extra))


def tvkd(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvkd", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env())


def run_dirs(results: Path) -> list[Path]:
    return sorted(p for p in results.glob("*/*") if p.is_dir()) if results.exists() else []


def metrics_of(results: Path) -> dict:
    (run,) = run_dirs(results)
    return json.loads((run / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------
# Fast checks, no launch


def test_single_process_is_unchanged(monkeypatch):
    from tvkd import distributed
    from tvkd.distributed import Distributed, launched_world_size, setup

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = setup()
    assert not d.enabled and d.is_main and launched_world_size() == 1
    assert d.from_main(lambda: 7) == 7 and d.gather("x") == ["x"]
    with d.main_first("x"), d.alone():
        pass
    assert distributed.current() is d
    assert Distributed(world_size=2, rank=1).is_main is False


def test_the_number_of_processes_is_part_of_the_run_identity(tiny_world, tmp_path, monkeypatch):
    from tvkd.config import load_config
    from tvkd.pipeline import identity

    cfg = load_config(write_cfg(tmp_path / "run.yaml", tiny_world, 2))
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    alone = identity(cfg, progress=False)
    assert "processes" not in alone  # single-process identities are what they were
    monkeypatch.setenv("WORLD_SIZE", "2")  # per_device_train_batch_size is per process: 2 x the batch
    assert identity(cfg, progress=False) == {**alone, "processes": 2}


def test_python_dash_m_tvkd_runs_the_cli():
    out = tvkd("losses")
    assert out.returncode == 0 and "dpo:" in out.stdout


# --------------------------------------------------------------------------------------------
# Two processes at batch 2 == one process at batch 4


def test_two_processes_train_like_one_at_the_same_global_batch(tiny_world, tmp_path):
    cache = Path(os.environ["TVKD_CACHE"])
    t0 = time.perf_counter()
    ddp = launch(["-m", "tvkd", "run", str(write_cfg(tmp_path / "ddp.yaml", tiny_world, 2)),
                  "--results", str(tmp_path / "ddp")])
    ddp_s = time.perf_counter() - t0
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("results: ") == 1  # printed by the main process, which wrote the run
    t0 = time.perf_counter()
    one = tvkd("run", str(write_cfg(tmp_path / "one.yaml", tiny_world, 4)), "--results", str(tmp_path / "one"))
    one_s = time.perf_counter() - t0
    assert one.returncode == 0, one.stderr[-3000:]

    # one run folder, written by the main process only, complete
    (run,) = run_dirs(tmp_path / "ddp")
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert yaml.safe_load((run / "config.yaml").read_text())["processes"] == 2
    assert not (run / "checkpoint").exists()
    got, want = metrics_of(tmp_path / "ddp"), metrics_of(tmp_path / "one")
    assert got["train_processes"] == 2 and want["train_processes"] == 1
    assert got["train_global_batch"] == want["train_global_batch"] == 4
    assert got["train_steps"] == want["train_steps"] == 3

    # the same pairs in the first step (the seeded order, split between the processes): the same loss
    first = abs(got["train_log_first"]["loss"] - want["train_log_first"]["loss"])
    last = abs(got["train_log_last"]["loss"] - want["train_log_last"]["loss"])  # after 2 averaged updates
    print(f"\nfirst-step loss |2 proc - 1 proc| = {first:.3g}; step-3 loss: {last:.3g}; "
          f"train_loss: {abs(got['train_loss'] - want['train_loss']):.3g}; launch {ddp_s:.1f}s, single {one_s:.1f}s")
    assert got["train_log_first"]["step"] == want["train_log_first"]["step"] == 1
    assert first <= 1e-5
    assert last <= 1e-5
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)  # the global mean, not rank 0's
    for key in ("logps/chosen", "logps/rejected", "margin", "grad_norm"):  # loss metrics: over both shares
        assert got["train_log_first"][key] == pytest.approx(want["train_log_first"][key], abs=1e-4), key
    assert got["margin_accuracy"] == want["margin_accuracy"]  # evaluated once, by the main process

    # each cache built once, by the main process; the others and the later run read it
    assert got["distributed"]["caches_built_by_rank"] == [
        {"reference": ["ref_logps"], "teacher": ["aux-soft_value@2"]}, {"reference": [], "teacher": []}]
    assert "reference cache (cached)" in one.stdout and "teacher cache (cached)" in one.stdout
    assert len([p for p in (cache / "teacher_cache").iterdir() if not p.name.startswith(".")]) == 1
    assert not list(cache.rglob(".*.tmp-*"))
    assert not [p for p in (cache / "ddp-scratch").rglob("*") if p.is_file()]  # scratch of rank 1 removed


# --------------------------------------------------------------------------------------------
# Failures end every process (slow: a launch each)

FAULTY = '''
import os, sys
import tvkd.training.trainer as tr

mode = os.environ["TVKD_TEST_FAIL"]
original = tr.PreferenceTrainer.compute_loss


def compute_loss(self, *a, **k):
    if mode == "kill-main-at-2" and os.environ.get("RANK") == "0" and self.state.global_step == 2:
        raise KeyboardInterrupt("killed")
    if mode == "fail-rank1" and os.environ.get("RANK") == "1" and self.state.global_step == 1:
        raise RuntimeError("rank 1 failed")
    return original(self, *a, **k)


tr.PreferenceTrainer.compute_loss = compute_loss
from tvkd.__main__ import main

sys.exit(main())
'''


@pytest.mark.slow
def test_an_error_of_the_main_process_ends_every_process(tiny_world, tmp_path):
    import fcntl

    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "ddp.yaml", tiny_world, 2)
    assert launch(["-m", "tvkd", "run", str(cfg), "--results", str(results), "--quiet"]).returncode == 0
    (run,) = run_dirs(results)
    stamp = (run / "metrics.json").stat().st_mtime_ns
    again = launch(["-m", "tvkd", "run", str(cfg), "--results", str(results)])  # complete: nothing to do
    assert again.returncode == 0 and again.stdout.count("results: ") == 1 and "already complete" in again.stdout
    assert run_dirs(results) == [run] and (run / "metrics.json").stat().st_mtime_ns == stamp
    fd = os.open(run / ".lock", os.O_RDWR)  # another live process writing the run
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t0 = time.perf_counter()
        out = launch(["-m", "tvkd", "run", str(cfg), "--results", str(results), "--force", "--quiet"])
        assert out.returncode != 0 and time.perf_counter() - t0 < 120
        assert out.stderr.count("being written by another live process") == 2  # both: one error line each
    finally:
        os.close(fd)
    assert json.loads((run / "status.json").read_text())["state"] == "complete"  # untouched


@pytest.mark.slow
def test_a_failed_worker_fails_the_run_without_a_hang(tiny_world, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    results = tmp_path / "results"
    t0 = time.perf_counter()
    out = launch([str(script), "run", str(write_cfg(tmp_path / "ddp.yaml", tiny_world, 2)), "--results",
                  str(results), "--quiet"], TVKD_TEST_FAIL="fail-rank1")
    assert out.returncode != 0 and time.perf_counter() - t0 < 120
    (run,) = run_dirs(results)
    assert json.loads((run / "status.json").read_text())["state"] in ("failed", "interrupted")


@pytest.mark.slow
def test_a_killed_multi_process_run_resumes_where_it_stopped(tiny_world, tmp_path):
    cfg = write_cfg(tmp_path / "ddp.yaml", tiny_world, 2, **{"train.save_strategy": "steps", "train.save_steps": 1})
    clean = launch(["-m", "tvkd", "run", str(cfg), "--results", str(tmp_path / "clean"), "--quiet"])
    assert clean.returncode == 0, clean.stderr[-3000:]
    want = metrics_of(tmp_path / "clean")

    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    results = tmp_path / "results"
    killed = launch([str(script), "run", str(cfg), "--results", str(results), "--quiet"],
                    TVKD_TEST_FAIL="kill-main-at-2")
    assert killed.returncode != 0
    (run,) = run_dirs(results)
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert not list((run / "checkpoint").rglob("rng_state_1.pth"))  # rank 1 wrote nothing in the run folder

    resumed = launch(["-m", "tvkd", "run", str(cfg), "--results", str(results)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    got = metrics_of(results)
    assert got["resumed_from_step"] == 2 and got["train_steps"] == want["train_steps"]
    assert got["train_log_last"]["loss"] == pytest.approx(want["train_log_last"]["loss"], abs=1e-6)


@pytest.mark.slow
def test_a_cache_stage_that_trains_a_model_runs_in_the_main_process_alone(tiny_world, tmp_path):
    """TIS-DPO trains two contrast models while the caches are built: in a launch, the main process
    trains them on its own (a Trainer there would otherwise wait for the others in DDP)."""
    cfg = write_cfg(tmp_path / "tis.yaml", tiny_world, 2, **{
        "loss": {"name": "tis_dpo", "contrast_learning_rate": 1e-3}, "models": {"student": tiny_world["student"]},
        "train.extra": {"max_steps": 3, "ddp_timeout": 60}})
    out = launch(["-m", "tvkd", "run", str(cfg), "--results", str(tmp_path / "results"), "--quiet"])
    assert out.returncode == 0, out.stderr[-3000:]
    models = sorted(p.name.rsplit("-", 1)[1] for p in (Path(os.environ["TVKD_CACHE"]) / "contrast_models").iterdir()
                    if not p.name.startswith("."))
    assert models == ["dpo", "rev"]
    assert metrics_of(tmp_path / "results")["train_processes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("pairs", [21, 23])
def test_an_uneven_last_batch_trains_like_one_process(tiny_world, tmp_path, pairs):
    """21 or 23 pairs in global batches of 4 over 2 processes: accelerate pads the last batch with pairs from the
    epoch's start; each process keeps its real pairs only (21: 1 on the main process, none on the other; 23: 2
    and 1), weighted so that the last step and train_loss equal one process's."""
    over = {"data.limit": pairs, "train.extra": {}, "train.num_train_epochs": 1}
    ddp = launch(["-m", "tvkd", "run", str(write_cfg(tmp_path / "ddp.yaml", tiny_world, 2, **over)),
                  "--results", str(tmp_path / "ddp"), "--quiet"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = tvkd("run", str(write_cfg(tmp_path / "one.yaml", tiny_world, 4, **over)), "--results",
               str(tmp_path / "one"), "--quiet")
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = metrics_of(tmp_path / "ddp"), metrics_of(tmp_path / "one")
    assert got["train_pairs"] == want["train_pairs"] == pairs
    assert got["train_steps"] == want["train_steps"] == 6
    assert got["train_log_last"]["step"] == 6
    print(f"\n{pairs} pairs: last-step loss |2 proc - 1 proc| = "
          f"{abs(got['train_log_last']['loss'] - want['train_log_last']['loss']):.3g}, train_loss "
          f"{abs(got['train_loss'] - want['train_loss']):.3g}")
    for key in ("loss", "logps/chosen", "logps/rejected", "margin"):  # the last step's, over the real pairs only
        assert got["train_log_last"][key] == pytest.approx(want["train_log_last"][key], abs=1e-5), key
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
    # the weights after the uneven step: the same model, so the same implicit rewards on the test pairs
    assert got["implicit_reward_margin"] == pytest.approx(want["implicit_reward_margin"], abs=1e-4)
