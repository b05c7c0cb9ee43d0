"""`rm` benchmark: a tiny LlamaForSequenceClassification scored through the real path, and the testbed oracle."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_tokenizer
from tvkd.benchmarks import BENCHMARKS, BenchContext
from tvkd.benchmarks.rm_score import rm_score

PROMPTS = [
    [{"role": "user", "content": "sort : c a b"}],
    [{"role": "user", "content": "reverse : a b"}],
    [{"role": "system", "content": "yes"}, {"role": "user", "content": "count : a b c d"}],
    [{"role": "user", "content": "hello world the cat"}],
]


def _tiny_rm(path, *, adds_bos: bool, pad: str | None = "pad"):
    """A 1-output Llama reward model with the tiny chat template, saved like a hub download."""
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tiny_tokenizer()
    if adds_bos:  # like Llama-3's tokenizer: tokenizing adds <bos>, and the template writes it too
        tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", tok.bos_token_id)])
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                      pad_token_id={"pad": tok.pad_token_id, "eos": tok.eos_token_id, None: None}[pad], bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False)
    LlamaForSequenceClassification(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _direct(rm_dir, prompt, answer, bos: str = "<bos>"):
    """The FsfairX card's recipe by hand: template text, BOS string removed, tokenized, one forward, logit 0."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    text = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    adds = tok("a")["input_ids"][0] == tok.bos_token_id
    text = text.replace(bos, "") if adds else text
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0]), ids[0].tolist()


# pad = eos: the model pools before the final <eot>, batched as unbatched; None: no pad id, batch > 1 still works
@pytest.mark.parametrize("adds_bos,pad", [(True, "eos"), (False, "pad"), (True, None)])
def test_rm_real_path_matches_a_direct_forward(tiny_world, tmp_path, adds_bos, pad):
    rm_dir = _tiny_rm(tmp_path / "rm", adds_bos=adds_bos, pad=pad)
    run = tmp_path / "run"
    ctx = BenchContext(run_dir=run, model_dir=tiny_world["student"], progress=False, say=lambda m: None,
                       options={"reward_model": rm_dir, "rm_batch_size": 3, "max_new_tokens": 6}, test_prompts=PROMPTS)
    metrics = rm_score(ctx)

    rows = [json.loads(line) for line in (run / "rm_scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    expected = []
    for r in rows:
        score, ids = _direct(rm_dir, r["prompt"], r["answer"])
        assert ids.count(2) == 1 and ids[0] == 2  # one <bos>, first: not doubled, not lost
        assert abs(r["score"] - score) < 1e-5
        expected.append(score)
    assert metrics["rm/n"] == len(PROMPTS)
    assert metrics["rm/score"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert metrics["rm/reward_model"] == rm_dir

    # the greedy answers are the run's saved generations, reused by a rerun (and by alpaca-eval)
    gens = list((run / "generations").glob("test-*.jsonl"))
    assert len(gens) == 1 and len(gens[0].read_text().splitlines()) == len(PROMPTS)
    ctx2 = BenchContext(run_dir=run, model_dir=tiny_world["student"], progress=False, say=lambda m: None,
                        options=dict(ctx.options, rm_batch_size=1), test_prompts=PROMPTS)
    ctx2.model = lambda: pytest.fail("a rerun must not load the model: its answers are saved")  # type: ignore
    again = rm_score(ctx2)
    assert again["rm/score"] == pytest.approx(metrics["rm/score"], abs=1e-5)


def test_rm_formatting_handles_bos_like_the_fsfairx_card(tmp_path):
    from tvkd.benchmarks.rm_score import HFRewardModel

    prompt, answer = PROMPTS[0], "a b c"
    with_bos = HFRewardModel(_tiny_rm(tmp_path / "a", adds_bos=True), batch_size=2)
    text = with_bos.format(prompt, answer)
    assert "<bos>" not in text and text.startswith("<user> sort")
    assert with_bos.encode(prompt, answer).count(2) == 1
    without = HFRewardModel(_tiny_rm(tmp_path / "b", adds_bos=False), batch_size=2)
    assert without.format(prompt, answer).startswith("<bos><user>")  # kept: the tokenizer will not add it
    assert without.encode(prompt, answer).count(2) == 1


def test_rm_oracle_equals_tasks_score(tiny_world, tmp_path):
    from tvkd.testbed import tasks

    run = tmp_path / "run"
    ctx = BenchContext(run_dir=run, model_dir=tiny_world["student"], testbed=True, progress=False,
                       say=lambda m: None, options={"max_new_tokens": 5}, test_prompts=PROMPTS[:3])
    metrics = rm_score(ctx)  # testbed: the oracle is the default reward model
    rows = [json.loads(line) for line in (run / "rm_scores.jsonl").read_text().splitlines()]
    direct = [tasks.score(r["prompt"][-1]["content"], r["answer"]) for r in rows]
    assert [r["score"] for r in rows] == direct
    assert metrics == {"rm/score": pytest.approx(sum(direct) / 3), "rm/n": 3, "rm/reward_model": "oracle"}

    from tvkd.benchmarks.rm_score import load_reward_model

    rm = load_reward_model("oracle", testbed=True)
    assert rm.score([[{"role": "user", "content": "sort : c a b"}]] * 2, ["a b c", "c b a"]) == [
        tasks.score("sort : c a b", "a b c"), tasks.score("sort : c a b", "c b a")]
    with pytest.raises(ValueError, match="testbed"):
        load_reward_model("oracle", testbed=False)


def test_rm_names_a_missing_model(tiny_world, tmp_path):
    from tvkd.modeling import ModelLoadError

    ctx = BenchContext(run_dir=tmp_path / "run", model_dir=tiny_world["student"], progress=False,
                       options={"reward_model": "no-such-org/no-such-rm-v0"}, test_prompts=PROMPTS)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-rm-v0.*local Hugging Face cache"):
        rm_score(ctx)
    assert not (tmp_path / "run" / "generations").exists()  # failed before generating anything


def test_rm_is_registered():
    assert BENCHMARKS.get("rm") is rm_score
    assert "reward_model" in BENCHMARKS.meta("rm")["options"]
