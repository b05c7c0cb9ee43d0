"""One mechanism for every content-addressed cache: build into a unique temporary folder, fsync,
rename atomically into place, under a lock so that two processes building the same key wait for
one build.

Used by tokenization, the reference and teacher caches (each column its own stage) and every
testbed stage. Guarantees:

- a reader sees a finished folder (its marker file is there) or nothing: a kill at any moment
  leaves at most a temporary folder, which the next build of that key removes once the process
  that made it is gone;
- two processes (two Ray trials, two `tvkd run`) asking for the same key build it once: the second
  waits on the lock, then finds the finished folder;
- the marker file is written last, after every other file is fsynced, and the rename is made
  durable by fsyncing the parent folder.

Locks are `flock`s on ``.locks/<name>.lock`` beside the folder (released by the OS when a process
dies, so a killed build never blocks the next). Temporary folders are named
``.<name>.tmp-<host>-<pid>-<random>``; only a folder of this host whose process is dead is
removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere concurrent builds are not serialised (each still lands atomically)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

MARKER = "done.json"


@dataclass(frozen=True)
class Stage:
    """A finished stage folder and the record its build returned."""

    path: Path
    record: dict[str, Any]
    cached: bool  # True when an earlier build (of any process) made it


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, owned by someone else
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Delete temporary folders under `parent` (of one stage `name`, or all) whose builder is dead."""
    removed = []
    pattern = f".{name}.tmp-*" if name else ".*.tmp-*"
    host = _host()
    for tmp in parent.glob(pattern):
        _, _, tail = tmp.name.rpartition(".tmp-")
        parts = tail.split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """An exclusive `flock` on `path` (created if needed); prints `waiting` if it has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if waiting:
                    print(waiting, file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (and `path` itself)."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read_marker(path: Path, marker: str = MARKER) -> dict[str, Any] | None:
    """The record of a finished stage folder, or None if it is not finished (or unreadable)."""
    try:
        record = json.loads((path / marker).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def cached_stage(path: str | os.PathLike, build: Callable[[Path], dict[str, Any] | None], *,
                 marker: str = MARKER, describe: str | None = None) -> Stage:
    """The finished folder at `path`, building it with ``build(tmp_dir) -> record`` if absent.

    `build` writes its files into the temporary folder it is given and returns a JSON-able
    record (or None), which becomes the marker file. `describe` names the stage in the message
    printed while waiting for another process's build of the same key.
    """
    path = Path(path)
    record = read_marker(path, marker)
    if record is not None:
        return Stage(path, record, True)
    parent, name = path.parent, path.name
    parent.mkdir(parents=True, exist_ok=True)
    what = describe or name
    with file_lock(parent / ".locks" / f"{name}.lock", waiting=f"waiting for another process building {what} ({path})"):
        record = read_marker(path, marker)
        if record is not None:  # built by the process we waited for
            return Stage(path, record, True)
        remove_stale_temps(parent, name)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-{_host()}-{os.getpid()}-"))
        try:
            t0 = time.perf_counter()
            record = build(tmp) or {}
            record = {**record, "built_s": round(time.perf_counter() - t0, 3)}
            fsync_tree(tmp)
            text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
            with open(tmp / marker, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if path.exists():  # an unfinished folder of an older layout: it holds no marker
                shutil.rmtree(path)
            os.rename(tmp, path)
            fsync_dir(parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == errno.ENOSPC and not e.filename:  # name the place, which the OS error leaves out
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Stage(path, record, False)


def save_dataset(dataset: Any, path: str | os.PathLike) -> None:
    """`datasets.Dataset.save_to_disk` without its per-save progress bar (a stage prints its own line)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if enabled:
            datasets.enable_progress_bars()
