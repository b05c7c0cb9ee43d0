"""Human-readable views of examples and sources, for ``tvkd data inspect``.

Seeing a few converted examples is the quickest check that an adapter read a data set the way
its card describes (which turn is the prompt, which response was chosen, what went to meta).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from tvkd.data.examples import Message, PreferenceExample, SFTExample

_INDENT = "    "


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip() + f" … [+{len(text) - max_chars} chars]"


def _messages(messages: list[Message], max_chars: int) -> list[str]:
    lines = []
    for m in messages:
        body = _clip(m["content"], max_chars) if m["content"].strip() else "(empty)"
        lines.append(f"  [{m['role']}]")
        lines.extend(textwrap.indent(body, _INDENT).splitlines() or [_INDENT])
    return lines


def _meta_line(meta: dict[str, Any], max_chars: int) -> str:
    shown = {k: v for k, v in meta.items() if k not in ("source", "split", "row", "format")}
    if not shown:
        return ""
    return "  meta: " + _clip(json.dumps(shown, ensure_ascii=False, default=str), max_chars)


def render_example(ex: PreferenceExample | SFTExample, max_chars: int = 400) -> str:
    """A multi-line view of one example; each message is cut to ``max_chars`` characters."""
    fmt = ex.meta.get("format", "conversational")
    lines = [f"── {ex.id}  [{fmt}]"]
    meta = _meta_line(ex.meta, max_chars)
    if meta:
        lines.append(meta)
    if isinstance(ex, PreferenceExample):
        for title, messages in (("prompt", ex.prompt), ("chosen", ex.chosen), ("rejected", ex.rejected)):
            lines.append(f"{title}:")
            lines.extend(_messages(messages, max_chars))
    else:
        lines.append("messages:")
        lines.extend(_messages(ex.messages, max_chars))
    return "\n".join(lines)


def inspect_source(
    source: str | Path,
    split: str = "train",
    n: int = 3,
    *,
    kind: str | None = None,
    adapter: str | None = None,
    max_chars: int = 400,
) -> str:
    """Load a source and describe it: the adapter, counts, skipped rows by reason, ``n`` examples.

    ``kind`` ("preference" | "sft") restricts the adapters considered; None lets the adapter
    decide (given, registered for the hub id, or chosen by the columns). The whole split is
    read so that the counts are the real ones.
    """
    from tvkd.data.loaders import load_source

    result = load_source(source, split=split, adapter=adapter, kind=kind)
    lines = [result.summary()]
    if result.skipped:
        lines.append("skipped:")
        lines.extend(f"  {reason}: {count}" for reason, count in sorted(result.skipped.items()))
    shown = result.examples[: max(n, 0)]
    if shown:
        lines.append(f"first {len(shown)} of {len(result.examples)} examples:")
        lines.extend(render_example(ex, max_chars) for ex in shown)
    return "\n".join(lines)
