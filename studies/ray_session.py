"""One Ray session for every Ray backend of the study engine: grids (`studies.ray_executor`) and
searches (`studies.search`) connect, reserve and forward their environment the same way.

    with ray_session(address=None, results=store.root):            # a local Ray on this machine's CPUs
        ...
    with ray_session(address="10.0.0.1:6379", results=store.root): # an existing cluster (`ray start`)
        ...

- Environment: a trial sees exactly what it needs, never a secret. `trial_env` forwards the results
  and cache roots, the offline / tokenizer settings of Hugging Face, the handful of ``TVKD_*``
  switches a run reads, and a ``PYTHONPATH`` that finds this checkout; nothing whose name says key,
  token, secret or password (Ray writes a runtime environment in clear text to
  ``runtime_env_agent.log`` on every node).
- Authentication: Ray 2.60 turns token authentication on for a new cluster. A local session
  (no address) follows ``RAY_AUTH_MODE`` when it is set and otherwise lets Ray create its token
  (``~/.ray/auth_token``). With ``--address`` the token must reach every node and the driver the way
  Ray reads it: ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` in their environment, or the same
  ``~/.ray/auth_token`` (``ray get-auth-token`` prints the head's); a node joining with ``ray start
  --address`` also needs ``RAY_AUTH_MODE=token``, which the driver sets for itself when it finds a
  token and no mode. A cluster that refuses the driver is one `RaySessionError` that says this.
- Resources: `check_resources` refuses (locally) or warns (on a cluster that may autoscale) when no
  node can hold one trial.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from studies.spec import Resources
from tvkd.paths import cache_root

__all__ = ["RaySessionError", "check_resources", "ray_session", "trial_env"]

#: Environment variables a trial needs to see as the driver does.
TRIAL_ENV_VARS = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
    "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY", "RAY_AUTH_MODE", "TVKD_DEBUG", "TVKD_GENERATION",
    "TVKD_DIST_WAIT_TIMEOUT", "TVKD_PEAK_TFLOPS", "OMP_NUM_THREADS",
)
#: A variable whose name matches this is never forwarded, whatever list it is on.
SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)(_|$)", re.IGNORECASE)


class RaySessionError(ConnectionError):
    """Ray could not be started or reached; the message says why and what to do."""


def trial_env(results: Path) -> dict[str, str]:
    """The environment variables every trial gets: `TRIAL_ENV_VARS` as the driver has them, the results
    root and cache root (absolute), and a PYTHONPATH that finds this checkout's `studies` and `tvkd`."""
    env = {k: v for k, v in os.environ.items() if k in TRIAL_ENV_VARS and not SECRET_NAME.search(k)}
    env["TVKD_RESULTS"] = str(Path(results).resolve())
    env["TVKD_CACHE"] = str(cache_root().resolve())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                  if p and p != root]])
    return env


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _token_available() -> bool:
    """A Ray auth token where Ray reads one: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path(path).is_file() if path else
                                                     (Path.home() / ".ray" / "auth_token").is_file())


REACH_TIMEOUT = 5.0  # s: a cluster's head answers a TCP connect at once; Ray itself retries for minutes


def check_reachable(address: str) -> None:
    """A `HOST:PORT` (or ``ray://HOST:PORT``) address whose host does not resolve or whose port does not
    accept a connection is one `RaySessionError` within seconds: `ray.init` would retry for minutes first."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    host = host.strip("[]")  # an IPv6 literal
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT).close()
    except socket.gaierror as e:
        raise RaySessionError(f"ray: cannot connect to the cluster at {address}: the host {host!r} does not resolve "
                              f"({e.strerror}); check --address (HOST:PORT of the head, port 6379 by default)") from None
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise RaySessionError(f"ray: cannot connect to the cluster at {address}: nothing answers there ({why} "
                              f"within {REACH_TIMEOUT:g} s); is `ray start --head` running there, on that port, "
                              "and does this machine reach it?") from None


def _connect(address: str, kwargs: dict[str, Any]) -> None:
    """`ray.init(address=...)`; what Ray raises becomes one `RaySessionError` saying what to check.

    A driver that has a token but no RAY_AUTH_MODE sends it (RAY_AUTH_MODE=token for this process): Ray 2.60's
    driver does not turn token mode on by itself when it joins a cluster, and a token cluster then answers
    "missing authorization header" until the connection times out."""
    import ray

    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        from ray._raylet import Config  # lazy: ray

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config per process: re-read, as Ray's own token setup does
    check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, AuthenticationError, ...
        text = " ".join(str(e).split())
        auth = "auth" in text.lower() or "token" in text.lower() or "unauthenticated" in text.lower()
        how = ("the cluster uses token authentication and this driver has no matching token: give it the head's "
               "token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray get-auth-token` on the head "
               "prints it), or start every node with RAY_AUTH_MODE=disabled on a trusted network") if auth else (
               "is `ray start --head` running there, and does this machine reach its port? If the cluster uses "
               "token authentication (Ray's default), this driver needs the head's token (RAY_AUTH_TOKEN, "
               "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        raise RaySessionError(f"ray: cannot connect to the cluster at {address}: {text[:300]}; {how}") from None


@contextmanager
def ray_session(address: str | None, results: Path, *, progress: bool = True,
                num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to ``address`` (an existing cluster) or start a local Ray on this machine's CPUs; yields
    whether this call opened the session (then it also closes it, and with it the Ray processes it started).
    A session already open in this process is used as it is."""
    import ray

    if ray.is_initialized():
        if progress:
            print("ray: using the Ray session already open in this process (its runtime environment is kept: make "
                  "sure its trials see TVKD_RESULTS / TVKD_CACHE)", flush=True)
        yield False
        return
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": trial_env(results)}, "log_to_driver": progress,
                              "logging_level": logging.INFO if progress else logging.WARNING}
    if address:
        _connect(address, kwargs)
    else:
        try:  # "local": never attach to a cluster that `ray start` left on this machine
            ray.init(address="local", num_cpus=num_cpus or _cpus(), include_dashboard=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to start the local Ray is the user's to see
            raise RaySessionError(f"ray: could not start a local Ray: {' '.join(str(e).split())[:300]}") from None
    try:
        yield True
    finally:
        ray.shutdown()


def check_resources(res: Resources, address: str | None) -> None:
    """A trial must fit on one node: say so now rather than let Tune wait for ever."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= res.cpu and n.get("GPU", 0) >= res.gpu for n in nodes):
        return
    largest = ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
    msg = (f"resources: a trial needs {res.cpu:g} CPU / {res.gpu:g} GPU on one node, the cluster's nodes have "
           f"{largest} (lower `resources:` in the study file or --resources, or add a node that has them)")
    if address:  # an autoscaling cluster may still add such a node
        print(f"warning: {msg}; the trials wait until there is one", file=sys.stderr, flush=True)
    else:
        raise ValueError(msg)
