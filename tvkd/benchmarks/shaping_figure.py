"""``shaping``: the paper's Figure 1, the teacher's per-token shaping ψ_t of a response with its top 3 (positive) marked.

For a (prompt, response) and a teacher, `shaping_profile` computes ψ_t for every response token a_t
(t = 0..T−1, the last one the end-of-turn token) exactly as the teacher cache does (docs/methods.md §A.2,
`tvkd.cache.teacher`): the response is tokenized the pipeline's way (`tvkd.tokenize.tokenize_example`), the
teacher's logits at the states s_0..s_T come from `tvkd.scoring.flat_state_logits` (cut to the vocabulary
shared with the student), the aux reward from `tvkd.aux_rewards.compute_aux`, and ψ_t from
`tvkd.shaping.shaping_terms`. By default the aux reward is TVKD's: Φ = soft_value at β_V = 2, and
ψ_t = γ·Φ(s_{t+1}) − Φ(s_t) with γ = 1 (pbrs, Φ(s_T) the teacher's value after EOS); any aux reward, Q
source, γ, shaping and terminal can be given. An action aux reward gives ψ_t = f(s_t, a_t).

`draw_html` writes the tokens as spans colored by ψ_t (green positive, red negative, on one symmetric scale),
the top 3 in bold with a border, and a legend; `draw_png` a matplotlib bar chart of ψ_t along the tokens
with the top 3 highlighted. `write_figure` writes both and the numbers (JSON).

The benchmark runs it for the first ``n`` test prompts of the run with the evaluated model's greedy answer
(generated through `tvkd.evaluation.generations`, kept in the run folder) and a teacher folder (option
``teacher``, default the run's ``models.teacher``), writing ``<run_dir>/figures/shaping-<i>.{html,png,json}``.
A teacher with another tokenizer than the model's values each answer's text on its own tokens (its tokenizer,
chat template and end-of-turn token, as `tvkd.cross_tokenizer` builds its cache): the figure shows ψ_t along
the teacher's tokens, and its JSON says so (``settings.tokens``).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tvkd.benchmarks import BENCHMARKS, BenchContext, one_of, positive_int, positive_number
from tvkd.config import DTYPES

TOP = 3  # tokens highlighted, as in the paper's Figure 1


@dataclass
class ShapingProfile:
    """Per-token shaping of one response under a teacher."""

    prompt: list[dict[str, Any]]  # the chat the response answers
    response: str
    prompt_ids: list[int]
    token_ids: list[int]  # the response's tokens a_0..a_{T-1} (end-of-turn included)
    tokens: list[str]  # how each token reads (its share of the decoded text)
    psi: list[float]  # ψ_t, t = 0..T-1
    values: list[float]  # Φ(s_0..s_T) for a state aux reward, f(s_t, a_t) for an action one
    top: list[int]  # positions of the largest ψ_t, largest first
    settings: dict[str, Any] = field(default_factory=dict)  # aux spec, γ, shaping, terminal, vocabulary

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("prompt", "response", "prompt_ids", "token_ids", "tokens", "psi",
                                              "values", "top", "settings")}


def top_positions(psi: Sequence[float], k: int = TOP) -> list[int]:
    """Positions of the k largest positive ψ_t, largest first (the earlier token first on a tie): the tokens the
    teacher rewards most. A ψ_t ≤ 0 is never among them (all of them negative: none is marked)."""
    order = sorted((t for t in range(len(psi)) if float(psi[t]) > 0), key=lambda t: (-float(psi[t]), t))
    return order[: max(0, int(k))]


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text (spaces included), so the pieces join to the response;
    a token whose decoding is not a prefix extension (a partial UTF-8 byte) shows its vocabulary entry."""
    out, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if cur.startswith(prev) and len(cur) > len(prev):
            out.append(cur[len(prev):])
        else:
            out.append(str(tokenizer.convert_ids_to_tokens(int(ids[i]))))
        prev = cur
    return out


def tokenize_response(tokenizer: Any, prompt: Sequence[dict[str, Any]], response: str,
                      config: Any = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids), as `tvkd.tokenize.tokenize_preferences` tokenizes a pair (same template,
    end-of-turn token, `response_tail` and length budget)."""
    from collections import Counter

    from tvkd.data.examples import PreferenceExample
    from tvkd.tokenize import TokenizeConfig, ensure_chat_template, tokenize_example

    config = config or TokenizeConfig()
    ensure_chat_template(tokenizer, config.chat_template)
    eos_token = config.eos_token or tokenizer.eos_token
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    answer = [{"role": "assistant", "content": response}]
    example = PreferenceExample(id="shaping", prompt=[dict(m) for m in prompt], chosen=answer, rejected=answer)
    prompt_ids, response_ids, _ = tokenize_example(example, tokenizer, eos_id, Counter(), config.response_tail)
    budget = config.max_length - len(prompt_ids)
    if budget < 1:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens: no room for a response within max_length "
                         f"{config.max_length}")
    return list(prompt_ids), list(response_ids[:budget])


def shaping_profile(
    teacher: Any, tokenizer: Any, prompt: Sequence[dict[str, Any]], response: str, *,
    aux: str = "soft_value", value_temperature: float | None = 2.0, q_source: str = "logits", gamma: float = 1.0,
    shaping: str = "pbrs", terminal: str = "teacher", vocab_size: int | None = None, tokenize_config: Any = None,
    top: int = TOP,
) -> ShapingProfile:
    """ψ_t of `response` to `prompt` under the `teacher` (a loaded causal LM), as the teacher cache computes it."""
    import torch

    from tvkd.api import AUX_REWARDS, AuxSpec
    from tvkd.aux_rewards import compute_aux
    from tvkd.scoring import flat_state_logits
    from tvkd.shaping import check_options, shaping_terms

    uses_t = AUX_REWARDS.meta(aux).get("uses_temperature")
    spec = AuxSpec(aux, q_source=q_source, temperature=value_temperature if uses_t else None)
    check_options(spec.kind, float(gamma), shaping, terminal)
    prompt_ids, resp_ids = tokenize_response(tokenizer, prompt, response, tokenize_config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    T = len(resp_ids)
    input_ids = torch.tensor([prompt_ids + resp_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        z = flat_state_logits(teacher, input_ids, torch.ones_like(input_ids), torch.tensor([len(prompt_ids)]),
                              torch.tensor([T]))  # [T+1, V]: s_0..s_T
        if vocab_size is not None:
            z = z[:, :vocab_size]
        # the token taken at each state; s_T has none (the pad id stands in, its value unused), as in the cache
        nxt = torch.tensor(resp_ids + [pad_id], dtype=torch.long, device=device)
        values = compute_aux(z, nxt, [spec])[spec.column].double().cpu()
    if spec.is_state:
        psi = shaping_terms(values[None], torch.tensor([T]), "state", float(gamma), shaping, terminal)[0]
    else:
        values = values[:T]
        psi = shaping_terms(values[None], torch.tensor([T]), "action")[0]
    psi_list = [float(x) for x in psi.tolist()]
    settings = {"aux": spec.name, "column": spec.column, "kind": spec.kind, "q_source": spec.q_source,
                "value_temperature": spec.temperature, "gamma": float(gamma), "shaping": shaping,
                "terminal": terminal, "vocab_size": vocab_size}
    return ShapingProfile(prompt=[dict(m) for m in prompt], response=response, prompt_ids=prompt_ids,
                          token_ids=resp_ids, tokens=token_strings(tokenizer, resp_ids), psi=psi_list,
                          values=[float(x) for x in values.tolist()], top=top_positions(psi_list, top),
                          settings=settings)


def describe(settings: dict[str, Any]) -> str:
    """The formula of ψ_t for these settings, in words for a caption."""
    name = settings["aux"] + (" of log π" if settings.get("q_source") == "logprobs" else "")
    if settings.get("value_temperature") is not None:
        name += f" (β_V = {settings['value_temperature']:g})"
    own = " (on the teacher's own tokens)" if str(settings.get("tokens", "")).startswith("the teacher's") else ""
    if settings.get("kind") == "action":
        return f"ψ_t = f(s_t, a_t), f = {name}{own}"
    g = settings["gamma"]
    phi_next = "Φ(s_{t+1})" if g == 1 else f"{g:g}·Φ(s_{{t+1}})"
    form = f"{phi_next} − Φ(s_t)" if settings["shaping"] == "pbrs" else phi_next
    end = "" if settings["terminal"] == "teacher" else ", Φ(s_T) = 0"
    return f"ψ_t = {form}, Φ = {name}{end}{own}"


def _rgba(x: float, scale: float) -> str:
    a = 0.0 if scale <= 0 else min(1.0, abs(x) / scale) * 0.85
    return f"rgba(0, 158, 115, {a:.3f})" if x >= 0 else f"rgba(213, 94, 0, {a:.3f})"


def _prompt_text(prompt: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


def draw_html(profile: ShapingProfile, path: str | Path, title: str | None = None) -> Path:
    """The response's tokens as spans colored by ψ_t, the top ones bold with a border, and a legend."""
    path = Path(path)
    psi, top = profile.psi, profile.top
    scale = max((abs(x) for x in psi), default=0.0)
    rank = {t: r for r, t in enumerate(top, 1)}
    spans = []
    for t, (tok, x) in enumerate(zip(profile.tokens, psi)):
        style = f"background:{_rgba(x, scale)}"
        cls = "tok"
        if t in rank:
            cls += " top"
        tip = f"t={t} id={profile.token_ids[t]} ψ={x:+.6g}" + (f" (top {rank[t]})" if t in rank else "")
        spans.append(f'<span class="{cls}" style="{style}" title="{html.escape(tip)}">{html.escape(tok)}</span>')
    top_rows = "".join(
        f"<li><span class='tok top'>{html.escape(profile.tokens[t])}</span> t={t}, ψ={psi[t]:+.6g}</li>"
        for t in top
    )
    caption = describe(profile.settings)
    head = html.escape(title or "Per-token shaping ψ_t of the response (Figure 1)")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{head}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.9; }}
.prompt {{ white-space: pre-wrap; color: #444; background: #f4f4f4; padding: .5em; }}
.tok {{ white-space: pre-wrap; font-family: monospace; padding: 1px 0; border: 2px solid transparent; }}
.top {{ font-weight: bold; border: 2px solid #000; border-radius: 3px; }}
.legend {{ display: flex; align-items: center; gap: .6em; font-size: .9em; margin: 1em 0; }}
.bar {{ width: 16em; height: 1em; border: 1px solid #999;
        background: linear-gradient(to right, {_rgba(-1, 1)}, rgba(255,255,255,1), {_rgba(1, 1)}); }}
</style></head><body>
<h2>{head}</h2>
<p>{html.escape(caption)}</p>
<div class="prompt">{html.escape(_prompt_text(profile.prompt))}</div>
<p class="response">{''.join(spans)}</p>
<div class="legend"><span>ψ_t:</span><span>{-scale:+.4g}</span><span class="bar"></span><span>{scale:+.4g}</span>
<span class="tok top">bold, framed</span><span>= {f"the top {len(top)} ψ_t > 0" if top else "none: no ψ_t > 0"}</span></div>
<ol class="toplist">{top_rows}</ol>
<p>Σ_t ψ_t = {sum(psi):+.6g} over {len(psi)} tokens.</p>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def _label(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t").strip() or repr(tok)


POSITIVE, NEGATIVE, TOP_COLOR = "#8fd1bb", "#f3b38a", "#009e73"  # the HTML's green / orange, the top darker green


def _wrap(text: str, width: int, lines: int) -> str:
    import textwrap

    out = []
    for para in text.splitlines() or [""]:
        out.extend(textwrap.wrap(para, width) or [""])
    return "\n".join(out[:lines] + (["..."] if len(out) > lines else []))


def png_figure(profile: ShapingProfile, title: str | None = None) -> Any:
    """The matplotlib Figure of `draw_png`: the prompt and the response above a bar per token of ψ_t."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    psi, top = profile.psi, profile.top
    T = len(psi)
    rank = {t: r for r, t in enumerate(top, 1)}
    width = min(48.0, max(8.0, 0.32 * T + 1.5))
    chars = int(width * 13)
    prompt = _wrap(_prompt_text(profile.prompt), chars, 3)
    response = _wrap(profile.response, chars, 3)
    fig = Figure(figsize=(width, 6.0))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=[1.0, 3.0])
    text_ax = fig.add_subplot(grid[0])
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, f"Prompt — {prompt}\n\nResponse — {response}", va="top", ha="left", fontsize=9,
                 family="monospace", transform=text_ax.transAxes)
    ax = fig.add_subplot(grid[1])
    colors = [TOP_COLOR if t in rank else (POSITIVE if x >= 0 else NEGATIVE) for t, x in enumerate(psi)]
    edges = ["black" if t in rank else "none" for t in range(T)]
    ax.bar(range(T), psi, color=colors, edgecolor=edges, linewidth=1.5)
    ax.axhline(0.0, color="#555", linewidth=0.8)
    span = max((abs(x) for x in psi), default=1.0) or 1.0
    for t, r in rank.items():
        ax.annotate(str(r), (t, psi[t]), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8,
                    fontweight="bold")
    ax.set_ylim(min(0.0, min(psi, default=0.0)) - 0.12 * span, max(0.0, max(psi, default=0.0)) + 0.15 * span)
    ax.set_xticks(range(T))
    ax.set_xticklabels([_label(tok) for tok in profile.tokens], rotation=90, fontsize=8 if T <= 80 else 6)
    for t, lab in enumerate(ax.get_xticklabels()):
        if t in rank:
            lab.set_fontweight("bold")
    ax.set_xlim(-0.6, T - 0.4)
    ax.set_ylabel("ψ_t")
    ax.set_xlabel("response tokens")
    handles = [Patch(facecolor=POSITIVE, label="ψ_t ≥ 0"), Patch(facecolor=NEGATIVE, label="ψ_t < 0")]
    handles.insert(0, Patch(facecolor=TOP_COLOR, edgecolor="black", label=f"top {len(top)} ψ_t > 0 (numbered)")
                   if top else Patch(facecolor="white", edgecolor="none", label="no ψ_t > 0: no top tokens"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(title or "Per-token shaping ψ_t of the response", fontsize=12, fontweight="bold")
    ax.set_title(f"{describe(profile.settings)};  Σ_t ψ_t = {sum(psi):+.4g} over {T} tokens", fontsize=10)
    fig.tight_layout()
    return fig


def draw_png(profile: ShapingProfile, path: str | Path, title: str | None = None) -> Path:
    """A bar per token of ψ_t along the x axis (tokens as tick labels, the prompt and the response above), the
    top positive ones framed and numbered; bar colours as in the legend (and the HTML's)."""
    import warnings

    path = Path(path)
    fig = png_figure(profile, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # a token the font has no glyph for draws as a box; say nothing
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.savefig(path, dpi=120 if len(profile.psi) <= 200 else 80)
    return path


def write_figure(profile: ShapingProfile, stem: str | Path, title: str | None = None) -> list[Path]:
    """``<stem>.html``, ``<stem>.png`` and ``<stem>.json`` (the numbers) of one profile."""
    stem = Path(stem)
    data = stem.with_suffix(".json")
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(profile.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return [draw_html(profile, stem.with_suffix(".html"), title), draw_png(profile, stem.with_suffix(".png"), title),
            data]


OPTIONS = {
    "n": "how many of the run's test prompts (the first n; default 5)",
    "teacher": "the teacher folder (default: the run's models.teacher)",
    "aux": "the aux reward (default soft_value; any of `tvkd aux`)",
    "value_temperature": "β_V of soft_value (default 2.0)",
    "q_source": "logits (default) or logprobs",
    "gamma": "γ (default 1.0)",
    "shaping": "pbrs (default) or next_only",
    "terminal": "teacher (default) or zero",
    "dtype": "the teacher's dtype (default: the run's cache.dtype, else models.dtype, else auto)",
    "max_new_tokens": "greedy answer budget (default: the run's eval.max_new_tokens, else 512)",
}


def _teacher_path(ctx: BenchContext) -> str:
    teacher = ctx.option("teacher")
    cfg = ctx.config
    if not teacher and cfg is not None and getattr(cfg.models, "teacher", None):
        from tvkd.pipeline import resolve

        teacher = resolve(cfg.models.teacher, dict(cfg.testbed) or None, ctx.progress)
    if not teacher:
        raise ValueError("shaping: give the teacher folder, --option teacher=<folder> (the run names no "
                         "models.teacher)")
    return str(teacher)


def _aux_name(v: Any) -> str | None:
    from tvkd.api import AUX_REWARDS  # lazy: torch

    return None if isinstance(v, str) and v in AUX_REWARDS else "a registered aux reward: " + ", ".join(
        AUX_REWARDS.names())


def _discount(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 else "a number in (0, 1]"


VALUES = {"n": positive_int, "aux": _aux_name, "value_temperature": positive_number,
          "q_source": one_of("logits", "logprobs"), "gamma": _discount, "shaping": one_of("pbrs", "next_only"),
          "terminal": one_of("teacher", "zero"),
          "dtype": one_of(*DTYPES),
          "max_new_tokens": positive_int}


@BENCHMARKS.register("shaping", description="Figure 1: the teacher's per-token shaping ψ_t of the model's greedy "
                     "answers, top 3 highlighted (HTML and PNG)", options=OPTIONS, values=VALUES)
def shaping_figures(ctx: BenchContext) -> dict[str, Any]:
    from tvkd.evaluation.generations import generations
    from tvkd.modeling import (
        VocabularyMismatchError,
        check_model_folder,
        load_causal_lm,
        load_tokenizer,
        model_digest,
        teacher_vocab_size,
    )
    from tvkd.tokenize import TokenizeConfig, ensure_chat_template

    n = int(ctx.option("n", 5))
    prompts = ctx.test_prompts[:n]
    if n < 1 or not prompts:
        raise ValueError("shaping: no test prompts (the run's outputs.jsonl holds none)" if n >= 1
                         else f"shaping: n must be >= 1, got {n}")
    cfg = ctx.config
    teacher_path = _teacher_path(ctx)
    check_model_folder(teacher_path, "shaping: the teacher")
    tok_cfg = cfg.tokenize if cfg is not None else TokenizeConfig()
    tokenizer = ctx.tokenizer()
    ensure_chat_template(tokenizer, tok_cfg.chat_template)
    remote = bool(getattr(getattr(cfg, "models", None), "trust_remote_code", False))
    teacher_tokenizer, teacher_cfg, tokenization = tokenizer, tok_cfg, "the model's"
    try:
        vocab = teacher_vocab_size(teacher_path, ctx.model_dir, tokenizer, trust_remote_code=remote)
    except VocabularyMismatchError:
        # A teacher with another tokenizer values the answer's text on its own tokens (its tokenizer, its chat
        # template and end-of-turn token, the run's lengths), as `tvkd.cross_tokenizer` does for the cache: the
        # figure then shows ψ_t along the teacher's tokens of the same answer.
        teacher_tokenizer = load_tokenizer(teacher_path, trust_remote_code=remote)
        teacher_cfg = replace(tok_cfg, chat_template=None, eos_token=None)
        ensure_chat_template(teacher_tokenizer, None)
        vocab, tokenization = None, "the teacher's own (its tokenizer differs from the model's)"
        ctx.say(f"shaping: the teacher's tokenizer differs from the model's ({len(teacher_tokenizer)} vs "
                f"{len(tokenizer)} tokens): each answer is shown on the teacher's own tokens and chat template")
    default_budget = cfg.eval.max_new_tokens if cfg is not None else 512
    answers = generations(ctx.model(), tokenizer, prompts,
                          {"max_new_tokens": int(ctx.option("max_new_tokens", default_budget))}, ctx.run_dir,
                          "greedy", model_key=model_digest(ctx.model_dir), progress=ctx.progress)
    # the teacher cache's dtype (`tvkd.pipeline`: cache.dtype, else models.dtype)
    dtype = ctx.option("dtype") or ((cfg.cache.dtype or cfg.models.dtype) if cfg is not None else "auto")
    teacher = load_causal_lm(teacher_path, dtype=dtype)
    settings = {
        "aux": str(ctx.option("aux", "soft_value")),
        "value_temperature": float(ctx.option("value_temperature", 2.0)),
        "q_source": str(ctx.option("q_source", "logits")),
        "gamma": float(ctx.option("gamma", 1.0)),
        "shaping": str(ctx.option("shaping", "pbrs")),
        "terminal": str(ctx.option("terminal", "teacher")),
    }
    files: list[str] = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        profile = shaping_profile(teacher, teacher_tokenizer, prompt, answer, vocab_size=vocab,
                                  tokenize_config=teacher_cfg, **settings)
        profile.settings.update(teacher=teacher_path, model=str(ctx.model_dir), teacher_dtype=str(dtype),
                                tokens=tokenization)
        for path in write_figure(profile, Path(ctx.run_dir) / "figures" / f"shaping-{i}"):
            files.append(str(path.relative_to(ctx.run_dir)))
    ctx.say(f"shaping: {len(prompts)} figures in {Path(ctx.run_dir) / 'figures'}")
    return {"shaping/files": files,
            "shaping/config": {**settings, "teacher": teacher_path, "teacher_dtype": str(dtype), "n": len(prompts),
                               "tokens": tokenization}}
