"""The Ray executor and the Ray search on a real two-node Ray cluster on loopback (`ray start` twice, one
CPU each), with Ray's default token authentication on.

Both nodes run on this machine, each with its own temp dir. They are stopped by killing the processes
their `ray start` started (one session each), not with `ray stop`, which kills every Ray process
on the machine, other people's clusters included. The token reaches the head, the second node and the
driver as Ray reads it (RAY_AUTH_TOKEN_PATH); a node that joins a token cluster also needs
RAY_AUTH_MODE=token (Ray enables the mode by itself only on the head and the driver, where it finds a token).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.test_study_ray import end_session, ray_spec, run_dirs, session_pids
from tvkd.results import RunRecord

pytestmark = pytest.mark.slow
pytest.importorskip("ray.tune")

from studies.engine import run_study  # noqa: E402
from studies.ray_executor import RayExecutor  # noqa: E402
from studies.search import search_study  # noqa: E402
from tests.test_study_search import tiny_search  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(args: list[str], log: Path, sessions: list[int], env: dict[str, str]) -> None:
    """`ray start ...` in a session of its own (its id joins `sessions`): every daemon and worker of that
    node stays in it."""
    with open(log, "w") as out:
        proc = subprocess.Popen([RAY, "start", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        sessions.append(proc.pid)
        rc = proc.wait(timeout=180)
    assert rc == 0, log.read_text()[-3000:]


def test_a_grid_and_a_search_on_a_two_node_cluster_with_token_auth(tiny_world, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's default: token authentication
    token = tmp_path / "ray-token"
    token.write_text(uuid.uuid4().hex)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    base_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    port = free_port()
    sessions: list[int] = []
    # short temp dirs: Ray's unix sockets live under them, and a socket path has at most 107 characters
    temp = [Path(tempfile.mkdtemp(prefix=f"tvkd-ray-{role}-", dir="/tmp")) for role in ("head", "worker")]
    try:
        ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                   "--include-dashboard=false", f"--temp-dir={temp[0]}"], tmp_path / "head.log", sessions, base_env)
        ray_start([f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                   f"--temp-dir={temp[1]}"], tmp_path / "worker.log", sessions, {**base_env, "RAY_AUTH_MODE": "token"})
        assert all(session_pids(sid) for sid in sessions)

        spec = ray_spec(tiny_world, "ray-cluster")
        results = tmp_path / "results"
        t0 = time.perf_counter()
        out = run_study(spec, RayExecutor(address=f"127.0.0.1:{port}", max_concurrent=2), results=results,
                        progress=False)
        print(f"4 trials on 2 nodes in {time.perf_counter() - t0:.1f}s")
        assert out["failed"] == [] and len(out["frame"]) == 4
        nodes = {t["node_id"] for t in out["trials"]}
        assert len(out["trials"]) == 4 and all(nodes) and len(nodes) == 2, out["trials"]  # both nodes ran trials
        dirs = run_dirs(results, "ray-cluster")
        assert len(dirs) == 4 and all(RunRecord.read(d).complete for d in dirs)

        # a search through the same cluster: `tvkd study search --backend ray --address HOST:PORT`
        found = search_study(tiny_search(tiny_world, name="cluster-alpha", n_trials=2), results=results,
                             storage=f"sqlite:///{tmp_path / 'search.db'}", progress=False, backend="ray",
                             address=f"127.0.0.1:{port}", max_concurrent=2)
        assert sum(t["state"] in ("complete", "pruned") for t in found["trials"]) == 2, found["trials"]
        assert (results / "cluster-alpha" / "tables" / "runs.csv").is_file()
    finally:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # the driver set it for itself (token found, no mode)
        for sid in reversed(sessions):  # `ray stop --force`, for these two nodes only
            end_session(sid)
        deadline = time.monotonic() + 30
        while any(session_pids(sid) for sid in sessions) and time.monotonic() < deadline:
            time.sleep(0.5)
        for d in temp:
            shutil.rmtree(d, ignore_errors=True)
    assert not any(session_pids(sid) for sid in sessions), "a Ray node did not stop"

