"""Teachers with another tokenizer: sequence-level teacher values on the teacher's own tokenization, joined by id.

A teacher whose vocabulary differs from the student's cannot score the student's token ids. What it
can give is a value of a *text*: TVKD with a state aux reward, ``shaping=pbrs`` and γ = 1 reads only
Ψ = Φ(s_T) − Φ(s_0) per response (docs/methods.md §A.3), and Φ(s_0), the value after the prompt, is
shared by both responses of a pair, so the pair offset is Φ_T(s_T^w) − Φ_T(s_T^l): the teacher's
values after each whole response. So each example is tokenized a second time, with the teacher's
tokenizer and its own chat template (`tokenize_for_teacher`, the same `tvkd.tokenize` code), the
teacher cache is built on that tokenization as for any teacher, and its columns are joined to the
student's pairs by example id (`join_by_id`), never by position. The §A.6 evaluator that needs only
sequence-level teacher values (``teacher_scores``: Σ log π_T, mean log π_T and Ψ, each the teacher's
own) runs on the teacher's tokenization of the test pairs (`for_evaluator`).

Refused, with the reason (`token_level_reason`), is whatever reads teacher values position by
position of the student's response: top-k distillation (the KD baselines), action aux rewards
(ψ_t = f(s_t, a_t) summed over the student's tokens), γ < 1 and ``next_only`` (each weights every
position, so the sum depends on how the response is cut into tokens), teacher rollouts (generated in
the teacher's vocabulary) and the teacher-reference losses; and, among evaluators, value alignment
(a KL between per-position distributions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from tvkd.tokenize import DEFAULT_CHAT_TEMPLATE, TokenizeConfig, TokenizedData, tokenize_preferences

# evaluators reading the teacher position by position of the student's tokens
TOKEN_LEVEL_EVALUATORS = {"value_alignment": "value alignment compares the teacher's and the student's values "
                                             "position by position, which needs one tokenization"}
SEQUENCE_LEVEL_EVALUATORS = ("teacher_scores",)

# a template's family, from a string only it writes (for the log line naming each model's template)
_FAMILIES = (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama-3"), ("<start_of_turn>", "Gemma"),
             ("[INST]", "Mistral/Llama-2"), ("<|user|>", "Zephyr"))


class CrossTokenizerError(ValueError):
    """A teacher with another tokenizer asked for something only a shared tokenizer gives; names why."""


@dataclass
class TeacherTokens:
    """The pairs in the teacher's own tokenization: what its cache is built on when its tokenizer differs."""

    tokenizer: Any
    train: TokenizedData | None  # None where no training column is read from the teacher
    test: TokenizedData | None  # None where no evaluator reads the teacher's values on the test pairs
    pad_id: int
    template: str  # `template_label` of the template used


def token_level_reason(loss_name: str, loss_cfg: Any, needs: Any) -> str | None:
    """Why the loss needs the teacher on the student's tokens (None: sequence-level values suffice)."""
    if needs.topk:
        return f"distils the teacher's top-{needs.topk} next-token distribution at every response position"
    if needs.teacher_logits:
        return "distils the teacher's next-token distribution at every response position (its logits, online)"
    if needs.teacher_reference:
        return "reads the teacher's and its SFT model's log-probs token by token"
    if needs.chosen_from == "teacher" or needs.rejected_from == "teacher":
        return "trains on the teacher's rollouts, generated in the teacher's vocabulary"
    if not needs.aux:
        return None
    if loss_name != "tvkd":
        return "reads the teacher's aux rewards token by token"
    if loss_cfg.kind == "action":
        return (f"uses the action aux reward {loss_cfg.aux!r}, ψ_t = f(s_t, a_t) summed over the student's "
                "response tokens")
    if loss_cfg.gamma != 1.0:
        return (f"uses gamma = {loss_cfg.gamma}: the discount weights every response position, so the offset "
                "depends on how each response is cut into tokens (only gamma = 1 telescopes to the values after "
                "the whole responses)")
    if loss_cfg.shaping != "pbrs":
        return (f"uses shaping = {loss_cfg.shaping!r}, a sum of the teacher's values at every response position "
                "(only pbrs with gamma = 1 telescopes to the values after the whole responses)")
    return None


def template_label(tokenizer: Any, override: str | None = None) -> str:
    """Which chat template a tokenizer renders with: its family (when known), where it comes from, a short hash."""
    template = override or getattr(tokenizer, "chat_template", None)
    if not template:
        return "tvkd's DEFAULT_CHAT_TEMPLATE (the tokenizer has none)"
    if template == DEFAULT_CHAT_TEMPLATE:
        origin = "tvkd's DEFAULT_CHAT_TEMPLATE"
    else:
        origin = "tokenize.chat_template" if override else "its own"
    family = next((name for marker, name in _FAMILIES if marker in template), None)
    digest = hashlib.sha256(template.encode()).hexdigest()[:8]
    return f"{origin}{f' ({family})' if family else ''}, sha256 {digest}"


def tokenize_for_teacher(examples: Any, teacher_tokenizer: Any, config: TokenizeConfig, student: TokenizedData,
                         *, where: str, progress: bool = True) -> TokenizedData:
    """`examples` in the teacher's tokenization (its own template and end-of-turn token, the run's lengths).

    Every pair the student trains on must be there, whole: a pair the teacher's tokenization skips or
    cuts would give it another text than the student's; that is an error naming the fix.
    """
    teacher_cfg = replace(config, chat_template=None, eos_token=None)
    out = tokenize_preferences(examples, teacher_tokenizer, teacher_cfg, progress=progress)
    for side, data in (("student", student), ("teacher", out)):
        if data.counts.get("truncated_responses"):
            raise CrossTokenizerError(
                f"{where}: {data.counts['truncated_responses']} responses are cut at tokenize.max_length under the "
                f"{side}'s tokenizer, so the teacher (another tokenizer) would value another text than the student "
                "trains on; raise tokenize.max_length or set tokenize.truncation: drop")
    ids = [str(i) for i in out.dataset["id"]]
    if len(set(ids)) != len(ids):
        raise CrossTokenizerError(f"{where}: example ids repeat; a teacher with another tokenizer is joined to "
                                  "the pairs by id, so every pair needs its own (give the rows unique ids)")
    missing = sorted(set(map(str, student.dataset["id"])) - set(ids))
    if missing:
        raise CrossTokenizerError(
            f"{where}: {len(missing)} pairs the student trains on do not fit the tokenize limits under the "
            f"teacher's tokenizer (e.g. ids {missing[:3]}); raise tokenize.max_length / max_prompt_length")
    return out


def join_by_id(columns: Any, column_ids: list[str], ids: list[str]) -> Any:
    """The rows of `columns` (one per `column_ids`) in the order of `ids`: the student's pairs, by example id."""
    where = {str(i): n for n, i in enumerate(column_ids)}
    if len(where) != len(column_ids):
        raise CrossTokenizerError("the teacher's columns hold an example id twice; they are joined by id")
    missing = [i for i in map(str, ids) if i not in where]
    if missing:
        raise CrossTokenizerError(f"the teacher's columns lack {len(missing)} pairs (e.g. ids {missing[:3]})")
    return columns.select([where[str(i)] for i in ids])


def for_evaluator(ctx: Any, teacher: TeacherTokens | None, name: str) -> Any:
    """The `EvalContext` evaluator `name` runs on: for a sequence-level one with a teacher of another tokenizer,
    the teacher's tokenization of the test pairs; a token-level one is refused (why)."""
    if teacher is None:
        return ctx
    if name in TOKEN_LEVEL_EVALUATORS:
        raise CrossTokenizerError(f"{name}: the teacher's tokenizer differs from the student's, and "
                                  f"{TOKEN_LEVEL_EVALUATORS[name]}")
    if name in SEQUENCE_LEVEL_EVALUATORS:
        if teacher.test is None:
            raise CrossTokenizerError(f"{name}: the teacher's tokenizer differs from the student's and the run's "
                                      "loss reads no teacher values, so the test pairs were not tokenized for it")
        return replace(ctx, test=teacher.test, tokenizer=teacher.tokenizer, pad_id=teacher.pad_id, teacher_vocab=None)
    return ctx


def run_evaluators_with(ctx: Any, teacher: TeacherTokens | None, say: Any = lambda msg: None) -> dict[str, Any]:
    """`run_evaluators`, with a teacher of another tokenizer: token-level evaluators skipped (saying why),
    sequence-level ones on the teacher's tokenization."""
    from tvkd.evaluation import EVALUATORS, enabled, run_evaluators

    if teacher is None or ctx.teacher is None:
        return run_evaluators(ctx, say=say)
    names = [n for n in (*TOKEN_LEVEL_EVALUATORS, *SEQUENCE_LEVEL_EVALUATORS) if enabled(ctx.cfg.eval, n)]
    off = {EVALUATORS.meta(n)["switch"]: type(getattr(ctx.cfg.eval, EVALUATORS.meta(n)["switch"]))(0) for n in names}
    metrics = run_evaluators(replace(ctx, cfg=replace(ctx.cfg, eval=replace(ctx.cfg.eval, **off))), say=say)
    for name in names:
        if name in TOKEN_LEVEL_EVALUATORS:
            say(f"  {name}: skipped (the teacher's tokenizer differs from the student's, and "
                f"{TOKEN_LEVEL_EVALUATORS[name]})")
            continue
        missing = [i for i in EVALUATORS.meta(name)["inputs"] if not ctx.available(i)]
        if missing:
            say(f"  {name}: skipped (needs {', '.join(missing)})")
            continue
        metrics.update(EVALUATORS.get(name)(for_evaluator(ctx, teacher, name)))
    return metrics
