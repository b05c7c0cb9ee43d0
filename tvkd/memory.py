"""Peak memory of a stretch of work: resident set size on the CPU, allocated memory on a GPU.

`peak_memory()` is a context manager yielding a dict that holds, once the block ends,
``rss_mb`` (the process's peak resident set size during the block, from Linux's ``VmHWM``,
which writing ``5`` to ``/proc/self/clear_refs`` resets; elsewhere the lifetime peak from
``getrusage``, marked ``rss_since_start``) and, when CUDA is in use, ``cuda_mb``
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:  # not Linux, or not permitted (some containers): fall back to the lifetime peak
        return False


def _rss_peak_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


@contextmanager
def peak_memory() -> Iterator[dict[str, Any]]:
    import torch

    out: dict[str, Any] = {}
    per_block = _reset_rss_peak()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        out["rss_mb"] = round(_rss_peak_mb(), 1)
        if not per_block:
            out["rss_since_start"] = True
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # initialised inside the block: its peak since then is the block's
            out["cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
