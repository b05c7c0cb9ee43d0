"""Multi-process (DDP) runs: which process is the main one, and how the others wait for it.

Launch one run over N processes (one per GPU, or N CPU processes)::

    accelerate launch --multi_gpu --num_processes N -m tvkd run my-run.yaml     # GPUs: NCCL; no GPU: gloo
    torchrun --nproc_per_node N -m tvkd run my-run.yaml                         # the same, without accelerate

On a machine with GPUs, ``ACCELERATE_USE_CPU=1`` in the environment makes it N CPU processes (gloo).
Note: ``accelerate launch --cpu --num_processes N`` on one machine starts *one* process (accelerate
runs multi-CPU jobs through ``mpirun --mpirun_hostfile ...``; started that way, the run is split too,
because the MPI rank variables are read as well).

What each process does in `tvkd.pipeline.execute`:

- every process plans the run (same inputs, same identity: the number of processes is part of it,
  since ``train.per_device_train_batch_size`` is *per process*: the global batch is per-device
  batch x processes x gradient accumulation);
- the main process (rank 0) plans first (it builds a testbed and tokenized data if needed), decides
  whether the run is already complete, and alone starts, locks and writes the results-store run
  folder; the others never take the run lock nor write there (their trainer output dir is a scratch
  folder under ``$TVKD_CACHE/ddp-scratch``, which holds only their RNG state at checkpoints);
- the reference/teacher caches are built by the main process first (`Distributed.main_first`), the
  others then read them (and the storage locks would serialise them anyway); a build that trains a
  model (testbed stages, contrast models) trains it in that one process (`Distributed.alone`);
- training is the `transformers.Trainer`'s own DDP; evaluation runs on the main process only, and the
  others wait for it to finish, then return the finished record and exit 0.

Failures do not hang the other processes: a main process that fails while the others wait for it
sends them its exception, which they raise (same type and message); a process that dies closes its
connections, which the others' pending gloo operations notice at once, and ``accelerate launch`` /
``torchrun`` stop the remaining workers when one exits with an error. What remains is a process that
hangs without dying; two timeouts bound it:

- training collectives (gradient all-reduce, loss gathering): the process group's timeout,
  ``train.extra.ddp_timeout`` seconds (the TrainingArguments field; default 1800);
- waiting for the main process (planning, a cache build, evaluation: possibly hours): a separate gloo
  group with timeout ``$TVKD_DIST_WAIT_TIMEOUT`` seconds (default 86400).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DDP_TIMEOUT_S = 1800  # transformers' TrainingArguments.ddp_timeout default
DEFAULT_WAIT_TIMEOUT_S = 86400
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
# What accelerate / transformers read to decide that a process is one of many (hidden by `alone`).
_LAUNCH_VARS = (*_WORLD_VARS, *_RANK_VARS, "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def env_world_size() -> int:
    """The number of processes a launcher started this one among (1 when not launched)."""
    return max(1, _env_int(_WORLD_VARS, 1))


def launched_world_size() -> int:
    """The number of processes of this launch (the joined group's, else the environment's)."""
    return _CURRENT.world_size if _CURRENT is not None else env_world_size()


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process); readable before any process group exists."""
    return _CURRENT.is_main if _CURRENT is not None else _env_int(_RANK_VARS, 0) == 0


def cpu_only() -> bool:
    import torch

    forced = os.environ.get("ACCELERATE_USE_CPU", "false").strip().lower() in ("1", "true", "yes", "on")
    return forced or not torch.cuda.is_available()


class MainProcessFailed(RuntimeError):
    """The main process failed with an exception that could not be sent as it was."""


@dataclass
class Distributed:
    """This process's place in a run: `world_size` 1 is a plain single-process run (every method a no-op)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    wait_group: Any = None  # a gloo group with the long timeout, for waiting on the main process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the main process decides, the others follow ------------------------------------------

    def _send(self, payload: dict[str, Any]) -> None:
        """Main: broadcast `payload` to the waiting processes (best effort: a gone process is logged)."""
        import torch.distributed as dist

        try:
            pickle.loads(pickle.dumps(payload))
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
            err = payload.get("error")
            payload = {"error": MainProcessFailed(f"{type(err).__name__}: {err}")}
        try:
            dist.broadcast_object_list([payload], src=0, group=self.wait_group)
        except Exception as e:  # noqa: BLE001 - the others are gone; their own failure is reported by them
            log.warning("could not reach the other processes: %s", e)

    def _receive(self) -> Any:
        """Non-main: wait for the main process's broadcast; raise its exception if it failed."""
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.wait_group)
        payload = box[0]
        if not isinstance(payload, dict):
            raise MainProcessFailed(f"unexpected message from the main process: {payload!r}")
        if "error" in payload:
            raise payload["error"]
        return payload.get("value")

    def from_main(self, fn: Callable[[], Any] | None) -> Any:
        """``fn()`` run on the main process only, its (picklable) value returned on every process.

        The others wait (gloo group, ``$TVKD_DIST_WAIT_TIMEOUT``); if `fn` raises on the main
        process, every process raises that exception. `fn` may be None on the non-main processes.
        """
        if not self.enabled:
            return fn() if fn is not None else None
        if not self.is_main:
            return self._receive()
        try:
            value = fn() if fn is not None else None
        except BaseException as e:
            self._send({"error": e})
            raise
        self._send({"value": value})
        return value

    @contextlib.contextmanager
    def main_first(self, what: str = "") -> Iterator[None]:
        """The main process runs the block first; the others run it after it succeeded (or raise its error).

        For stages that build shared caches: the main process builds, the others find them built.
        """
        if not self.enabled:
            yield
            return
        if not self.is_main:
            self._receive()
            yield
            return
        try:
            yield
        except BaseException as e:
            self._send({"error": e})
            raise
        self._send({"value": what})

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """This process on its own: a Trainer made inside the block trains single-process.

        For one-time builds that train a model (testbed SFT/DPO stages, TIS-DPO's contrast models)
        while the other processes wait: a Trainer made in a launched process would otherwise join
        DDP and wait for the others forever (until the timeout). The launch variables are hidden
        and accelerate's state is reset on entry and rebuilt on exit; the process group stays.
        A Trainer made inside must not be used after the block.
        """
        if not self.enabled:
            yield
            return
        from accelerate.state import AcceleratorState, PartialState

        saved = {k: os.environ.pop(k) for k in _LAUNCH_VARS if k in os.environ}
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            yield
        finally:
            os.environ.update(saved)
            AcceleratorState._reset_state(reset_partial_state=True)
            PartialState(cpu=cpu_only())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (a collective: every process must call it)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.wait_group)
        return out

    def scratch_dir(self, run_dir: str | os.PathLike) -> Path:
        """A non-main process's trainer output dir for one run (outside the results store, kept across attempts)."""
        from tvkd.paths import cache_root, fingerprint

        return cache_root() / "ddp-scratch" / fingerprint(str(Path(run_dir).resolve())) / f"rank{self.rank}"

    def remove_scratch(self, run_dir: str | os.PathLike) -> None:
        if self.enabled and not self.is_main:
            path = self.scratch_dir(run_dir)
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the run's folder, once every rank removed its own


_SINGLE = Distributed()
_CURRENT: Distributed | None = None


def current() -> Distributed:
    """The state `setup` made (single-process if it was not called or found no launcher)."""
    return _CURRENT or _SINGLE


def setup(ddp_timeout_s: float | None = None) -> Distributed:
    """Join the process group of a launched multi-process run (once per process); single-process otherwise.

    The default process group is made here, through `accelerate.PartialState` (gloo on CPU, NCCL on
    GPUs), with `ddp_timeout_s` (the run's ``train.extra.ddp_timeout``, default 1800 s): the Trainer
    made later finds it and uses it. A second gloo group with ``$TVKD_DIST_WAIT_TIMEOUT`` seconds is
    made for the waits on the main process. Collective: every process of the launch must call it.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if env_world_size() <= 1:
        return _SINGLE
    import torch.distributed as dist
    from accelerate import PartialState

    timeout = timedelta(seconds=float(ddp_timeout_s or DEFAULT_DDP_TIMEOUT_S))
    cpu = cpu_only()
    if not dist.is_initialized():
        state = PartialState(cpu=cpu, timeout=timeout)
        if not dist.is_initialized():  # a launch accelerate does not recognise: plain env:// rendezvous
            dist.init_process_group(backend="gloo" if cpu else "nccl", timeout=timeout)
    else:
        state = PartialState(cpu=cpu)
    wait_s = float(os.environ.get("TVKD_DIST_WAIT_TIMEOUT") or DEFAULT_WAIT_TIMEOUT_S)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    local = getattr(state, "local_process_index", None)
    _CURRENT = Distributed(world_size=dist.get_world_size(), rank=dist.get_rank(),
                           local_rank=int(local) if local is not None and local >= 0 else 0,
                           backend=str(dist.get_backend()), wait_group=group)
    return _CURRENT


def teardown() -> None:
    """Leave the process group (end of `python -m tvkd`); nothing if none was joined."""
    global _CURRENT
    _CURRENT = None
    import sys

    dist = sys.modules.get("torch.distributed")  # not imported: no group was joined (and importing costs seconds)
    if dist is None:
        return
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
