"""Where tvkd keeps caches and results, and the one content-hash used to key them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """sha256 of a file's bytes, or of every file under a folder (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
