"""`shaping`: Figure 1, the teacher's per-token shaping ψ_t of a response, top 3 highlighted."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch

from tvkd.benchmarks import BenchContext
from tvkd.benchmarks.shaping_figure import shaping_figures, shaping_profile, top_positions, write_figure

PROMPT = [{"role": "user", "content": "sort c a b"}]
RESPONSE = "a b c the cat hello world yes"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def teacher(tiny_world):
    from tvkd.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_world["teacher"], dtype="float32", device="cpu"), load_tokenizer(tiny_world["teacher"])


def _direct_states(model, prompt_ids, token_ids) -> torch.Tensor:
    """Teacher logits [T+1, V] at s_0..s_T from one plain full forward (float64)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0].double()
    p = len(prompt_ids)
    return logits[p - 1: p + len(token_ids)]


def test_psi_is_the_teachers_soft_value_difference(teacher):
    model, tok = teacher
    prof = shaping_profile(model, tok, PROMPT, RESPONSE)
    assert prof.prompt_ids == tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
    assert prof.token_ids[-1] == tok.eos_token_id and len(prof.token_ids) == len(RESPONSE.split()) + 1
    z = _direct_states(model, prof.prompt_ids, prof.token_ids)
    phi = 2.0 * torch.logsumexp(z / 2.0, dim=-1)  # soft value at β_V = 2 of s_0..s_T
    psi = (1.0 * phi[1:] - phi[:-1]).tolist()  # pbrs, γ = 1, Φ(s_T) the teacher's value after EOS
    assert prof.psi == pytest.approx(psi, abs=1e-5)
    assert prof.values == pytest.approx(phi.tolist(), abs=1e-5)
    assert prof.top == [t for t in sorted(range(len(psi)), key=lambda t: -psi[t]) if psi[t] > 0][:3]
    assert all(prof.psi[t] >= prof.psi[u] for t in prof.top for u in range(len(psi)) if u not in prof.top)
    assert "".join(prof.tokens) == tok.decode(prof.token_ids, skip_special_tokens=False)
    assert prof.settings["column"] == "soft_value@2" and prof.settings["gamma"] == 1.0


def test_other_aux_rewards_and_shaping_options(teacher):
    model, tok = teacher
    base = dict(aux="margin", gamma=0.9, shaping="pbrs", terminal="zero")
    prof = shaping_profile(model, tok, PROMPT, RESPONSE, **base)
    z = _direct_states(model, prof.prompt_ids, prof.token_ids)
    top2 = torch.softmax(z, -1).topk(2, -1).values
    phi = top2[:, 0] - top2[:, 1]
    phi[-1] = 0.0  # terminal zero
    assert prof.psi == pytest.approx((0.9 * phi[1:] - phi[:-1]).tolist(), abs=1e-5)
    act = shaping_profile(model, tok, PROMPT, RESPONSE, aux="log_prob")
    logp = torch.log_softmax(z[:-1], -1).gather(-1, torch.tensor(act.token_ids)[:, None])[:, 0]
    assert act.psi == pytest.approx(logp.tolist(), abs=1e-5) and len(act.values) == len(act.token_ids)
    with pytest.raises(ValueError, match="action aux reward"):
        shaping_profile(model, tok, PROMPT, RESPONSE, aux="log_prob", gamma=0.5)


def test_psi_equals_the_teacher_cache(teacher, tmp_path):
    """The same numbers as the cached column the TVKD loss reads, turned into ψ_t by `shaping_terms`."""
    from tvkd.api import AuxSpec
    from tvkd.cache.teacher import build_teacher_cache
    from tvkd.data.examples import PreferenceExample
    from tvkd.shaping import shaping_terms
    from tvkd.tokenize import tokenize_preferences

    model, tok = teacher
    ex = PreferenceExample(id="x", prompt=PROMPT, chosen=[{"role": "assistant", "content": RESPONSE}],
                           rejected=[{"role": "assistant", "content": "no"}])
    data = tokenize_preferences([ex], tok, cache_dir=tmp_path / "tok", progress=False)
    spec = AuxSpec("soft_value", temperature=2.0)
    cache = build_teacher_cache(data.dataset, data.fingerprint, model, "teacher", [spec], pad_id=tok.pad_token_id,
                                cache_dir=tmp_path / "cache", progress=False)
    phi = torch.tensor([cache.dataset[0][f"chosen/{spec.column}"]], dtype=torch.float64)
    cached = shaping_terms(phi, torch.tensor([phi.shape[1] - 1]), "state")[0].tolist()
    prof = shaping_profile(model, tok, PROMPT, RESPONSE)
    assert prof.token_ids == list(data.dataset[0]["chosen_ids"])
    assert prof.psi == pytest.approx(cached, abs=1e-6)


def test_top_positions():
    assert top_positions([0.1, 0.5, -1.0, 0.5, 0.3]) == [1, 3, 4]
    assert top_positions([0.2, 0.1]) == [0, 1]
    assert top_positions([0.2, -0.1, -0.3, 0.0]) == [0]  # never a ψ_t <= 0
    assert top_positions([-0.2, -0.1]) == []


def test_html_and_png(teacher, tmp_path):
    model, tok = teacher
    prof = shaping_profile(model, tok, PROMPT, RESPONSE)
    files = write_figure(prof, tmp_path / "figures" / "shaping-0")
    assert [f.name for f in files] == ["shaping-0.html", "shaping-0.png", "shaping-0.json"]
    assert (tmp_path / "figures" / "shaping-0.png").read_bytes()[:8] == PNG
    page = (tmp_path / "figures" / "shaping-0.html").read_text(encoding="utf-8")
    response = page.split('<p class="response">', 1)[1].split("</p>", 1)[0]
    for tok_text in prof.tokens:
        assert html.escape(tok_text) in response
    k = len(prof.top)
    assert response.count('class="tok top"') == k and response.count('class="tok"') == len(prof.tokens) - k
    for t in prof.top:
        assert f"t={t} id={prof.token_ids[t]}" in response
    assert "legend" in page and f"top {k}" in page and ".top {" in page and "border" in page
    data = json.loads((tmp_path / "figures" / "shaping-0.json").read_text())
    assert data["psi"] == prof.psi and data["top"] == prof.top


def test_benchmark_writes_figures_for_the_first_n_prompts(tiny_world, tmp_path):
    from tvkd.modeling import load_causal_lm, load_tokenizer

    run = tmp_path / "run"
    prompts = [[{"role": "user", "content": p}] for p in ("sort c a b", "reverse a b", "hello world")]
    ctx = BenchContext(run_dir=run, model_dir=Path(tiny_world["student"]), test_prompts=prompts,
                       options={"teacher": tiny_world["teacher"], "n": 2, "max_new_tokens": 6}, progress=False,
                       say=lambda msg: None)
    metrics = shaping_figures(ctx)
    files = metrics["shaping/files"]
    assert sorted(files) == sorted(f"figures/shaping-{i}.{ext}" for i in range(2) for ext in ("html", "png", "json"))
    for f in files:
        assert (run / f).is_file() and (run / f).stat().st_size > 0
    assert (run / "figures" / "shaping-0.png").read_bytes()[:8] == PNG
    assert not (run / "figures" / "shaping-2.html").exists()
    assert list((run / "generations").glob("greedy-*.jsonl"))  # the greedy answers, kept for reuse
    data = json.loads((run / "figures" / "shaping-1.json").read_text())
    teacher = load_causal_lm(tiny_world["teacher"], dtype="float32", device="cpu")
    again = shaping_profile(teacher, load_tokenizer(tiny_world["student"]), prompts[1], data["response"])
    assert data["psi"] == pytest.approx(again.psi, abs=1e-6) and data["prompt"] == prompts[1]
    assert metrics["shaping/config"]["aux"] == "soft_value" and metrics["shaping/config"]["value_temperature"] == 2.0


def test_a_teacher_with_another_tokenizer_is_shown_on_its_own_tokens(tiny_world, tmp_path):
    """The other-vocabulary teacher is the same network behind permuted ids, renamed specials and its own
    template: on its own tokens of the same answers its ψ_t must equal the shared teacher's, token for token."""
    from tests.test_cross_tokenizer import OTHER_TEMPLATE
    from tvkd.testbed.vocab import other_vocabulary

    other = other_vocabulary(tiny_world["teacher"], tmp_path / "teacher_other", template=OTHER_TEMPLATE)
    prompts = [[{"role": "user", "content": p}] for p in ("sort c a b", "reverse a b")]
    said, out = [], {}
    for name, teacher in (("shared", tiny_world["teacher"]), ("other", str(other))):
        ctx = BenchContext(run_dir=tmp_path / name, model_dir=Path(tiny_world["student"]), test_prompts=prompts,
                           options={"teacher": teacher, "n": 2, "max_new_tokens": 6}, progress=False,
                           say=said.append)
        out[name] = shaping_figures(ctx)
    assert out["shared"]["shaping/config"]["tokens"] == "the model's"
    assert out["other"]["shaping/config"]["tokens"].startswith("the teacher's own")
    assert any("tokenizer differs" in line for line in said)
    for i in range(2):
        a, b = (json.loads((tmp_path / name / "figures" / f"shaping-{i}.json").read_text()) for name in ("shared", "other"))
        assert a["response"] == b["response"] and len(a["psi"]) == len(b["psi"])
        assert a["token_ids"] != b["token_ids"]  # the teacher's own ids
        assert b["psi"] == pytest.approx(a["psi"], abs=1e-5)
        assert "(on the teacher&#x27;s own tokens)" in (tmp_path / "other" / "figures" / f"shaping-{i}.html").read_text()


def test_benchmark_needs_a_teacher_and_prompts(tiny_world, tmp_path):
    ctx = BenchContext(run_dir=tmp_path, model_dir=Path(tiny_world["student"]),
                       test_prompts=[[{"role": "user", "content": "hello"}]])
    with pytest.raises(ValueError, match="teacher"):
        shaping_figures(ctx)
    ctx = BenchContext(run_dir=tmp_path, model_dir=Path(tiny_world["student"]), options={"teacher": "x"})
    with pytest.raises(ValueError, match="no test prompts"):
        shaping_figures(ctx)


def test_shaping_is_registered_with_its_options():
    from tvkd.benchmarks import BENCHMARKS

    assert BENCHMARKS.get("shaping") is shaping_figures
    assert {"n", "teacher", "aux", "gamma"} <= set(BENCHMARKS.meta("shaping")["options"])


def test_png_colours_match_its_legend_and_it_shows_prompt_and_response(teacher):
    from dataclasses import replace

    from matplotlib.colors import to_hex

    from tvkd.benchmarks.shaping_figure import png_figure

    model, tok = teacher
    prof = shaping_profile(model, tok, PROMPT, RESPONSE)
    prof = replace(prof, psi=[0.5, -0.2, 0.1, -0.4, 0.3] + [0.0] * (len(prof.psi) - 5))
    prof = replace(prof, top=top_positions(prof.psi))
    fig = png_figure(prof)
    bars_ax = fig.axes[1]
    bar_colours = {to_hex(p.get_facecolor()) for p in bars_ax.patches}
    legend = bars_ax.get_legend()
    legend_colours = {to_hex(h.get_facecolor()) for h in legend.legend_handles}
    assert bar_colours <= legend_colours  # every bar's colour is explained
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0] == "top 3 ψ_t > 0 (numbered)"
    shown = fig.axes[0].texts[0].get_text()
    assert PROMPT[0]["content"] in shown and RESPONSE.split()[0] in shown  # prompt and response on the figure
    assert fig._suptitle.get_text() == "Per-token shaping ψ_t of the response"
    assert "Φ = soft_value" in bars_ax.get_title()
    # all ψ_t negative: nothing is called "top"
    neg = replace(prof, psi=[-abs(x) - 0.1 for x in prof.psi], top=top_positions([-abs(x) - 0.1 for x in prof.psi]))
    assert neg.top == []
    fig = png_figure(neg)
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert not any(t.startswith("top") for t in texts) and "no ψ_t > 0: no top tokens" in texts
    assert not fig.axes[1].texts  # no rank numbers
