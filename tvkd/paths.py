"""Where tvkd keeps caches and results, and the one content-hash used to key them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Root of all caches (testbed, tokenized data, teacher caches): $TVKD_CACHE or ~/.cache/tvkd."""
    return Path(os.environ.get("TVKD_CACHE", Path.home() / ".cache" / "tvkd")).expanduser()


def results_root() -> Path:
    """Root of the results store: $TVKD_RESULTS or ./results."""
    return Path(os.environ.get("TVKD_RESULTS", "results")).expanduser()


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 2.0 and 2 must hash alike
    return obj


def fingerprint(*parts: Any, length: int = 16) -> str:
    """Stable hex digest of JSON-able parts (dict order and 2.0-vs-2 do not matter)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(_canonical(part), sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


FULL_HASH_LIMIT = 64 << 20  # files up to 64 MiB are hashed whole
_BLOCK = 1 << 20
_SAMPLES = 32


def _file_hash(h: Any, p: Path) -> None:
    """Add one file's content to `h`: whole if small, else its size and sampled blocks (see content_digest)."""
    size = p.stat().st_size
    h.update(str(size).encode())
    with open(p, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(_BLOCK), b""):
                h.update(chunk)
            return
        offsets = [0, size - _BLOCK] + [(size - _BLOCK) * i // (_SAMPLES + 1) for i in range(1, _SAMPLES + 1)]
        for off in offsets:
            f.seek(off)
            h.update(f.read(_BLOCK))


def content_digest(path: str | os.PathLike, length: int = 16, exclude: Collection[str] = ()) -> str:
    """A key for the content of a file or of every file under a folder (names and contents).

    The rule: a file of up to 64 MiB is hashed whole (sha256); a larger one by its size and 34
    blocks of 1 MiB (its first, its last and 32 evenly spaced between), so a 16 GB checkpoint is
    identified by reading 34 MiB. Any retraining changes every block of a weights file, so the
    sampled blocks tell two checkpoints apart; an in-place edit of a few bytes of a large file
    between the sampled blocks would go unseen. No modification time enters the key: a copy of
    the same files has the same key. In a folder, files and folders whose name starts with "."
    are skipped (locks, temporary files), and so are the files named in ``exclude`` (by name, at any depth).
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        _file_hash(h, path)
    else:
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts) or p.name in exclude:
                continue
            h.update(str(rel).encode() + b"\x00")
            _file_hash(h, p)
    return h.hexdigest()[:length]


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask (0644 or 0664 as a rule)."""
    try:  # Linux says it without changing it (os.umask to read it would briefly clear it for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would hide the store from the group
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC and not e.filename:  # name the file, which the OS error leaves out
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
