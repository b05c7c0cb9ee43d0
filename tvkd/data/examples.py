"""The examples every data set is converted into, whatever its original schema.

Everything downstream (tokenization, teacher cache, trainer, evaluation) sees only these two
types, so a new data set is one adapter and nothing else changes.

Messages are ``{"role": ..., "content": ...}`` dicts (roles: system, user, assistant, tool).
Plain-text rows are stored as messages too (the prompt as one user message, each response as one
assistant message) with ``meta["format"] == "text"``, so tokenization can treat them as plain
text, as TRL does (no chat template; the EOS token appended to each response).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


def _copy_messages(messages: Any, name: str) -> list[Message]:
    if not isinstance(messages, list):
        raise ValueError(f"{name} must be a list of messages, got {type(messages).__name__}")
    return [dict(m) for m in messages]


def _require(d: dict[str, Any], keys: tuple[str, ...], kind: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"a {kind} must be built from a dict, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"a {kind} dict needs the keys {', '.join(keys)}; missing: {', '.join(missing)}")


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: a prompt and a chosen and a rejected response to it.

    ``prompt`` is the conversation up to the response (it ends with a user turn);
    ``chosen`` / ``rejected`` hold only the assistant message(s) of each response.
    ``meta`` keeps the source's extra fields (ratings, score gaps, source row, ``format``);
    it must stay JSON-serialisable because it is stored with the tokenized data.
    """

    id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        """True for plain-text rows (tokenized without a chat template)."""
        return self.meta.get("format") == "text"

    def to_dict(self) -> dict[str, Any]:
        """A deep, JSON-ready copy: ``{id, prompt, chosen, rejected, meta}``."""
        return {
            "id": self.id,
            "prompt": _copy_messages(self.prompt, "prompt"),
            "chosen": _copy_messages(self.chosen, "chosen"),
            "rejected": _copy_messages(self.rejected, "rejected"),
            "meta": copy.deepcopy(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreferenceExample:
        """Inverse of :meth:`to_dict` (``meta`` may be absent)."""
        _require(d, ("id", "prompt", "chosen", "rejected"), "PreferenceExample")
        return cls(
            id=str(d["id"]),
            prompt=_copy_messages(d["prompt"], "prompt"),
            chosen=_copy_messages(d["chosen"], "chosen"),
            rejected=_copy_messages(d["rejected"], "rejected"),
            meta=copy.deepcopy(d.get("meta") or {}),
        )


@dataclass(frozen=True)
class SFTExample:
    """One supervised conversation; the assistant turns are the training targets."""

    id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        """True for plain-text prompt/completion rows (tokenized without a chat template)."""
        return self.meta.get("format") == "text"

    def to_dict(self) -> dict[str, Any]:
        """A deep, JSON-ready copy: ``{id, messages, meta}``."""
        return {
            "id": self.id,
            "messages": _copy_messages(self.messages, "messages"),
            "meta": copy.deepcopy(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SFTExample:
        """Inverse of :meth:`to_dict` (``meta`` may be absent)."""
        _require(d, ("id", "messages"), "SFTExample")
        return cls(
            id=str(d["id"]),
            messages=_copy_messages(d["messages"], "messages"),
            meta=copy.deepcopy(d.get("meta") or {}),
        )
