"""Row conversion shared by all adapters: message validation and TRL's row formats.

TRL's preference formats (https://huggingface.co/docs/trl/dataset_formats):

* explicit prompt, plain text: ``{"prompt": str, "chosen": str, "rejected": str}``;
* explicit prompt, conversational: ``{"prompt": [messages], "chosen": [assistant message(s)],
  "rejected": [...]}`` (a string prompt is taken as one user message);
* implicit prompt, conversational: ``{"chosen": [full conversation], "rejected": [...]}``; the
  prompt is the shared prefix ``chosen[:-1] == rejected[:-1]`` and the responses are the last
  (assistant) messages. Data sets in the alignment-handbook layout also carry a ``prompt``
  string that repeats the first user turn; with full conversations it is ignored, because the
  conversations themselves are the complete record.

Implicit prompts are read only from conversations: for plain text, the boundary between a
shared prompt and the responses is a guess (TRL splits at the longest common prefix, which can
cut into the first word of the responses), so plain-text rows must name their prompt.

Every helper raises :class:`FieldProblem`; the adapter context adds source and row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tvkd.data.errors import FieldProblem, describe
from tvkd.data.examples import Message

ROLES = ("system", "user", "assistant", "tool")
# Role names of other chat formats (ShareGPT, Gemini, ...) and the role they mean here.
_ROLE_HINTS = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "chatgpt": "assistant",
}
_FIX_MESSAGES = "Give every message a 'role' and a string 'content', or drop the row."


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def normalize_message(message: Any, field: str, index: int) -> Message:
    """Check one message and return a plain ``{role, content}`` dict (other keys are dropped)."""
    if not isinstance(message, Mapping):
        raise FieldProblem(
            field,
            f"message {index} must be a {{role, content}} object, got {describe(message)}",
            _FIX_MESSAGES,
        )
    role, content = message.get("role"), message.get("content")
    if role is None:
        keys = ", ".join(str(k) for k, v in message.items() if v is not None)
        hint = ""
        if "from" in message and "value" in message:
            hint = " (ShareGPT style: rename 'from' to 'role' and 'value' to 'content')"
        raise FieldProblem(field, f"message {index} has no 'role' (its keys: {keys}){hint}", _FIX_MESSAGES)
    if not isinstance(role, str) or role not in ROLES:
        hint = f" (write {_ROLE_HINTS[role]!r} instead of {role!r})" if role in _ROLE_HINTS else ""
        raise FieldProblem(
            field,
            f"message {index} has unknown role {role!r}; expected one of {', '.join(ROLES)}{hint}",
            "Fix the role or drop the row.",
        )
    if content is None:
        raise FieldProblem(field, f"message {index} ({role}) has no 'content'", _FIX_MESSAGES)
    if not isinstance(content, str):
        raise FieldProblem(
            field,
            f"message {index} ({role}) content must be a string, got {describe(content)}",
            _FIX_MESSAGES,
        )
    return {"role": role, "content": content}


def normalize_messages(value: Any, field: str) -> list[Message]:
    """Check a non-empty list of messages; return plain ``{role, content}`` dicts."""
    if not isinstance(value, (list, tuple)):
        raise FieldProblem(field, f"expected a list of {{role, content}} messages, got {describe(value)}")
    if not value:
        raise FieldProblem(field, "the message list is empty")
    return [normalize_message(m, field, i) for i, m in enumerate(value)]


def _form(value: Any, field: str) -> str:
    """'text' or 'messages' for a response field; raises on anything else."""
    if value is None:
        raise FieldProblem(field, "missing or null", "Add the field to the row or drop the row.")
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "messages"
    raise FieldProblem(
        field, f"expected a string or a list of {{role, content}} messages, got {describe(value)}"
    )


def _require_assistant_last(messages: list[Message], field: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise FieldProblem(
            field,
            f"the last message must be the assistant's response, got role {messages[-1]['role']!r}",
            "End the conversation with the assistant's response or drop the row.",
        )


def _first_difference(a: Sequence[Message], b: Sequence[Message]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def preference_from_row(
    row: Mapping[str, Any],
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
) -> tuple[list[Message], list[Message], list[Message], str]:
    """Convert one row in any TRL preference format into ``(prompt, chosen, rejected, format)``.

    ``format`` is ``"text"`` for plain-text rows and ``"conversational"`` otherwise.
    """
    chosen, rejected = row.get(chosen_field), row.get(rejected_field)
    form_c, form_r = _form(chosen, chosen_field), _form(rejected, rejected_field)
    if form_c != form_r:
        raise FieldProblem(
            rejected_field,
            f"{chosen_field!r} is {'a string' if form_c == 'text' else 'a message list'} but {rejected_field!r} is "
            f"{'a string' if form_r == 'text' else 'a message list'}; both responses must have the same form",
        )
    if form_c == "text":
        prompt = row.get(prompt_field)
        if prompt is None:
            raise FieldProblem(
                prompt_field,
                "missing or null; plain-text chosen/rejected need an explicit prompt "
                "(an implicit prompt is only read from full conversations)",
                "Add the prompt or drop the row.",
            )
        if not isinstance(prompt, str):
            raise FieldProblem(
                prompt_field, f"plain-text chosen/rejected need a plain-text prompt, got {describe(prompt)}"
            )
        return [user(prompt)], [assistant(chosen)], [assistant(rejected)], "text"

    c, r = normalize_messages(chosen, chosen_field), normalize_messages(rejected, rejected_field)
    if c[0]["role"] != "assistant" or r[0]["role"] != "assistant":
        # Implicit prompt: both are full conversations that share everything but the last turn.
        _require_assistant_last(c, chosen_field)
        _require_assistant_last(r, rejected_field)
        if c[:-1] != r[:-1]:
            k = _first_difference(c[:-1], r[:-1])
            raise FieldProblem(
                rejected_field,
                f"prompt mismatch: chosen and rejected must share the conversation before their last message, "
                f"but they differ at message {k} (chosen has {len(c) - 1} prompt messages, rejected {len(r) - 1})",
                "Give both conversations the same prompt turns, or split the row into an explicit "
                "'prompt' plus assistant-only 'chosen'/'rejected'.",
            )
        return c[:-1], c[-1:], r[-1:], "conversational"

    # Explicit prompt: chosen/rejected hold only the assistant's response.
    prompt = row.get(prompt_field)
    if prompt is None:
        raise FieldProblem(
            prompt_field,
            "missing or null; chosen/rejected hold only assistant messages, so the prompt must be given",
            "Add the prompt (a string or a message list) or drop the row.",
        )
    if isinstance(prompt, str):
        p = [user(prompt)]
    else:
        p = normalize_messages(prompt, prompt_field)
    for messages, field in ((c, chosen_field), (r, rejected_field)):
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                raise FieldProblem(
                    field,
                    f"message {i} has role {m['role']!r}; with an explicit prompt, a response holds only "
                    f"assistant messages",
                    "Move the other turns into the prompt or drop the row.",
                )
    if p[-1]["role"] == "assistant":
        raise FieldProblem(
            prompt_field,
            "the prompt ends with an assistant message; it must end with the turn the response answers",
            "Move the assistant message into the responses or drop the row.",
        )
    return p, c, r, "conversational"


def _blank(messages: Sequence[Message]) -> bool:
    return not any(m["content"].strip() for m in messages)


def preference_skip_reason(
    prompt: list[Message], chosen: list[Message], rejected: list[Message]
) -> str | None:
    """Why a well-formed pair carries no preference signal, or None.

    Reasons, checked in this order: ``empty_prompt``, ``empty_response`` (no non-blank text in a
    response), ``identical_pair`` (the responses are equal up to surrounding whitespace).
    """
    if _blank(prompt):
        return "empty_prompt"
    if _blank(chosen) or _blank(rejected):
        return "empty_response"
    if [(m["role"], m["content"].strip()) for m in chosen] == [
        (m["role"], m["content"].strip()) for m in rejected
    ]:
        return "identical_pair"
    return None


def sft_from_row(row: Mapping[str, Any]) -> tuple[list[Message], str]:
    """Convert one row of TRL's SFT formats into ``(messages, format)``.

    ``{"messages": [...]}`` (conversational) or ``{"prompt": ..., "completion": ...}`` (both
    strings: plain text; both message lists, or a string prompt with a message-list completion:
    conversational). The conversation must end with an assistant message.
    """
    if row.get("messages") is not None:
        messages = normalize_messages(row["messages"], "messages")
        _require_assistant_last(messages, "messages")
        return messages, "conversational"
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is None or completion is None:
        missing = (
            "messages"
            if prompt is None and completion is None
            else ("prompt" if prompt is None else "completion")
        )
        raise FieldProblem(
            missing,
            "missing or null; an SFT row needs 'messages', or 'prompt' and 'completion'",
            "Add the field or drop the row.",
        )
    form_p = _form(prompt, "prompt")
    form_c = _form(completion, "completion")
    if form_c == "text":
        if form_p != "text":
            raise FieldProblem(
                "completion", "a plain-text completion needs a plain-text prompt, got a message list"
            )
        return [user(prompt), assistant(completion)], "text"
    p = [user(prompt)] if form_p == "text" else normalize_messages(prompt, "prompt")
    c = normalize_messages(completion, "completion")
    _require_assistant_last(c, "completion")
    return p + c, "conversational"


def sft_skip_reason(messages: list[Message]) -> str | None:
    """``empty_prompt`` (no non-blank turn before the answers) or ``empty_response`` (a blank
    assistant turn: it would teach the model to answer with nothing), or None."""
    if _blank([m for m in messages if m["role"] != "assistant"]):
        return "empty_prompt"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        return "empty_response"
    return None
