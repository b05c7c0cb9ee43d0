"""The one cache mechanism (`tvkd.storage.cached_stage`): atomic, crash-safe, one build per key."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from tvkd.storage import _host, cached_stage, read_marker, remove_stale_temps


def _slow_build(path: str, log: str, tag: str, out: mp.Queue) -> None:
    def build(tmp: Path) -> dict:
        with open(log, "a") as f:  # one line per build that actually ran
            f.write(tag + "\n")
        (tmp / "value.txt").write_text("x" * 1000)
        time.sleep(1.0)  # long enough for the other process to arrive mid-build
        return {"tag": tag}

    stage = cached_stage(Path(path), build, describe="a test stage")
    out.put((tag, stage.cached, stage.record["tag"], (stage.path / "value.txt").read_text()))


def test_two_processes_build_the_same_key_once(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    path, log = tmp_path / "stage-key", tmp_path / "builds.log"
    procs = [ctx.Process(target=_slow_build, args=(str(path), str(log), tag, out)) for tag in ("a", "b")]
    for p in procs:
        p.start()
        time.sleep(0.2)
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1  # one build
    builder = log.read_text().strip()
    # both got the same finished stage: the builder built it, the other waited and found it
    assert {r[2] for r in results} == {builder} and {r[3] for r in results} == {"x" * 1000}
    assert sorted(r[1] for r in results) == [False, True]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(tmp: Path) -> dict:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        cached_stage(tmp_path / "s", build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks"]
    stage = cached_stage(tmp_path / "s", lambda tmp: {"ok": 1})
    assert not stage.cached and read_marker(tmp_path / "s")["ok"] == 1
    again = cached_stage(tmp_path / "s", lambda tmp: pytest.fail("rebuilt a finished stage"))
    assert again.cached and again.record["ok"] == 1


def test_an_unfinished_folder_is_replaced(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "junk").write_text("from a crashed older layout")
    stage = cached_stage(tmp_path / "s", lambda tmp: (tmp / "good").write_text("1") and {"v": 2})
    assert sorted(p.name for p in stage.path.iterdir()) == ["done.json", "good"]
    assert json.loads((stage.path / "done.json").read_text())["v"] == 2


def test_only_dead_builders_temps_are_swept(tmp_path):
    dead = tmp_path / f".s.tmp-{_host()}-999999999-abc"
    alive = tmp_path / f".s.tmp-{_host()}-{os.getpid()}-abc"
    other_host = tmp_path / ".s.tmp-elsewhere-999999999-abc"
    for d in (dead, alive, other_host):
        d.mkdir()
    assert remove_stale_temps(tmp_path) == [dead]
    assert alive.exists() and other_host.exists()


def test_store_files_are_readable_by_the_group(tmp_path):
    """Atomic writes go through mkstemp (0600); the file moved in place has open()'s mode instead."""
    import os
    import stat

    from tvkd.paths import atomic_write_text, default_file_mode

    old = os.umask(0o002)
    try:
        assert default_file_mode() == 0o664
        atomic_write_text(tmp_path / "metrics.json", "{}")
        assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) & stat.S_IRGRP


def test_a_model_folder_is_keyed_by_what_it_is_not_by_how_long_it_took_to_build(tmp_path):
    from tvkd.modeling import model_digest
    from tvkd.paths import content_digest

    def folder(name: str, weights: bytes, wall_s: float) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama"}')
        (d / "model.safetensors").write_bytes(weights)
        (d / "stage.json").write_text(json.dumps({"stage": "student_sft", "wall_s": wall_s}))
        return d

    a, b, c = folder("a", b"w" * 64, 21.9), folder("b", b"w" * 64, 87.2), folder("c", b"v" * 64, 21.9)
    assert content_digest(a) != content_digest(b)  # the whole folder: its build record differs
    assert model_digest(a) == model_digest(b)  # the same weights built twice are one model (one run identity)
    assert model_digest(a) != model_digest(c)
