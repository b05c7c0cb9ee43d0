"""Figures saved byte-identically from run to run: fixed dpi, no time stamps or software versions."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FIGURE_DPI", "save_figure"]

#: What matplotlib writes into a PNG/PDF unless told not to: time stamps, its version.
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
FIGURE_DPI = 150


def save_figure(fig: Any, stem: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> dict[str, Path]:
    """Save a matplotlib figure as ``<stem>.png`` / ``<stem>.pdf`` byte-identically from run to run
    (fixed dpi, no time stamps or software versions in the metadata, written atomically); returns
    ``{format: path}``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt in formats:
        buf = io.BytesIO()
        metadata = PNG_METADATA if fmt == "png" else PDF_METADATA if fmt == "pdf" else None
        fig.savefig(buf, format=fmt, dpi=FIGURE_DPI, metadata=metadata)
        path = stem.with_suffix(f".{fmt}")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        out[fmt] = path
    return out
